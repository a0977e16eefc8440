"""histokt.atomic: whole files only, with the mode the umask gives (a lab shares a study's results)."""

import os
import stat

import pytest

from histokt import atomic


@pytest.fixture
def with_umask():
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_mode_the_umask_gives(with_umask, tmp_path, mask):
    with_umask(mask)
    assert atomic.umask() == mask
    atomic.write_json(tmp_path / "a" / "result.json", {"x": 1})
    with atomic.atomic_path(tmp_path / "a" / "ckpt.pt") as tmp:
        tmp.write_bytes(b"weights")
    for name in ("result.json", "ckpt.pt"):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == 0o666 & ~mask, name
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o777 & ~mask
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["ckpt.pt", "result.json"]  # no temporary left


def test_a_failed_write_leaves_the_old_file(tmp_path):
    atomic.write_bytes(tmp_path / "f", b"old")
    with pytest.raises(RuntimeError), atomic.atomic_path(tmp_path / "f") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert (tmp_path / "f").read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]
