"""`histokt store upgrade`: format 1 -> format 2 exactly (every patch read back equals its format-1 bytes),
at the smallest content size that reproduces the patches; resumable after a kill; refusals in one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from histokt.cli import main
from histokt.ingest.tiling import mirror_pad
from histokt.store import upgrade as upgrade_module
from histokt.store.schema import FORMAT, SPLITS, PatchReader, list_datasets, open_attrs
from histokt.store.shards import pad_on_read
from histokt.store.upgrade import content_size, upgrade
from histokt.store.verify import verify_store
from tests.conftest import ROOT
from tests.fixtures.format1 import chunk_file, labels_of, pcam_like, read_v1_patch, tissue_patches, write_v1_dataset
from tests.fixtures.stores import assert_same_store, tree_bytes, write_v2_dataset

P = 272


@pytest.fixture(scope="module")
def old_store(tmp_path_factory):
    """A format-1 store: crc (full 272 px tissue windows, one small padded image among them; no valid
    split) and pcam (93 px content padded to 272, with a flat and a coarse-grained patch)."""
    old = tmp_path_factory.mktemp("v1") / "old.zarr"
    write_v1_dataset(
        old, "crc", {"train": (tissue_patches(6, 1), labels_of(6)), "test": (tissue_patches(2, 2), labels_of(2))}
    )
    write_v1_dataset(
        old,
        "pcam",
        {s: (pcam_like(n, seed), labels_of(n)) for s, n, seed in (("train", 9, 3), ("valid", 4, 4), ("test", 3, 5))},
    )
    return old


def assert_exact(old, new, name):
    """Every patch read through the format-2 reader is the format-1 patch; metadata copied as it was."""
    attrs = open_attrs(new, name)
    old_attrs = json.loads((old / name / "zarr.json").read_text())["attributes"]
    assert {k: v for k, v in attrs.items() if k not in ("format", "content_size", "shard_size")} == {
        k: v for k, v in old_attrs.items() if k != "format"
    }
    assert list(attrs) == [*list(old_attrs)[:5], "content_size", "shard_size", *list(old_attrs)[5:]]
    for split in SPLITS:
        reader = PatchReader(new, name, split)
        n = old_attrs["counts"][split]
        assert len(reader) == n and reader.shape == (n, P, P, 3)
        for i in range(n):
            assert np.array_equal(reader.read(i), read_v1_patch(old / name / split / "images", i, P)), (split, i)
        for array in ("labels", "source_id", "box"):
            assert tree_bytes(old / name / split / array) == tree_bytes(new / name / split / array)
    assert tree_bytes(old / name / "sources") == tree_bytes(new / name / "sources")


def test_upgrade_is_exact_at_the_smallest_content_size(old_store, tmp_path):
    new = tmp_path / "new.zarr"
    done = upgrade(old_store, new, progress=False, shard_size=4)  # 4 per shard: several, partial last ones
    assert [(d.name, d.status, d.content_size) for d in done] == [
        ("crc", "upgraded", [P, P]),
        ("pcam", "upgraded", [93, 93]),
    ]
    for name in ("crc", "pcam"):
        assert_exact(old_store, new, name)
    attrs = open_attrs(new, "pcam")
    assert attrs["format"] == FORMAT and attrs["content_size"] == [93, 93] and attrs["shard_size"] == 4
    assert open_attrs(new, "crc")["content_size"] == [P, P]
    assert PatchReader(new, "pcam", "train").content_shape == (93, 93)
    assert zarr.open_array(str(new / "pcam" / "train" / "images"), mode="r").shape == (9, 93, 93, 3)
    report = verify_store(new, progress=False)
    assert report.sound and report.shards == 2 + 1 + 3 + 1 + 1 and report.patches == 8 + 16
    assert sorted(p.name for p in new.iterdir()) == ["crc", "pcam", "zarr.json"]  # no work folder left

    before = tree_bytes(new)
    assert [d.status for d in upgrade(old_store, new, progress=False, shard_size=4)] == ["skipped", "skipped"]
    assert tree_bytes(new) == before


def test_each_dataset_appears_by_one_rename_of_its_finished_hidden_folder(old_store, tmp_path, monkeypatch):
    new = tmp_path / "new.zarr"
    renames = []
    real = os.rename

    def spy(src, dst):
        if Path(dst).parent == new:
            assert Path(src).name.startswith(".upgrade-") and list_datasets(new) == sorted(d for _, d, _ in renames)
            renames.append((os.stat(src).st_ino, Path(dst).name, tree_bytes(src)))
        real(src, dst)

    monkeypatch.setattr(upgrade_module.os, "rename", spy)
    upgrade(old_store, new, progress=False, shard_size=4)
    assert [name for _, name, _ in renames] == ["crc", "pcam"]
    for inode, name, tree in renames:  # the very folder, already whole: nothing was added after
        assert os.stat(new / name).st_ino == inode and tree_bytes(new / name) == tree


def test_cli_upgrade_then_verify(old_store, tmp_path, capsys):
    new = tmp_path / "new.zarr"
    assert main(["store", "upgrade", str(old_store), str(new), "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{new}/crc: upgraded train 6, valid 0, test 2 patches (272x272 px content of 272 px)",
        f"{new}/pcam: upgraded train 9, valid 4, test 3 patches (93x93 px content of 272 px)",
        f"{new}: check it with 'histokt verify {new}'",
    ]
    assert open_attrs(new, "pcam")["shard_size"] == 512
    assert_exact(old_store, new, "pcam")
    assert main(["verify", str(new), "--no-progress"]) == 0
    assert "2 datasets, 6 splits, 5 shards, 24 patches" in capsys.readouterr().out
    assert main(["store", "upgrade", str(old_store), str(new), "--no-progress"]) == 0
    assert f"{new}/pcam: already upgraded: train 9" in capsys.readouterr().out


def test_content_size_finds_the_mirror_exactly():
    rng = np.random.default_rng(0)

    def padded(h, w, n=3, p=40, grain=1):
        c = rng.integers(0, 256, (n, -(-h // grain), -(-w // grain), 3), dtype=np.uint8)
        c = c.repeat(grain, 1).repeat(grain, 2)[:, :h, :w]
        return [mirror_pad(x, p) for x in c]

    assert content_size(padded(40, 40), 40) == (40, 40)
    assert content_size(padded(13, 40), 40) == (13, 40)  # rows only
    assert content_size(padded(40, 21), 40) == (40, 21)
    assert content_size(padded(2, 3), 40) == (2, 3)
    assert content_size(padded(1, 1), 40) == (1, 1)
    assert content_size(padded(17, 11, grain=2), 40) == (17, 11)  # rows and columns repeat in pairs
    flat = np.full((40, 40, 3), 7, np.uint8)
    assert content_size([flat], 40) == (1, 1)
    assert content_size([flat, *padded(9, 9)], 40) == (9, 9)  # common to all patches
    assert content_size([*padded(9, 9), *padded(12, 12)], 40) == (40, 40)  # 9 px patches do not mirror at 12
    assert content_size(padded(9, 9) + padded(40, 40, n=1), 40) == (40, 40)
    # columns settle at once, rows only later: 9 rows (period 16) and 13 (period 24) both mirror at 24
    mixed = padded(13, 40) + padded(9, 40)
    assert content_size(mixed, 40) == (25, 40)
    assert all(np.array_equal(pad_on_read(x[:25], 40), x) for x in mixed)
    for h, w in rng.integers(1, 41, (20, 2)):
        patches = padded(int(h), int(w))
        ch, cw = content_size(patches, 40)
        assert (ch, cw) == (h, w)


def test_the_mirror_check_is_numpy_reflect():
    """On 0/1 pixels, where accidental mirrors abound: n passes exactly when padding a[:n] gives a."""
    rng = np.random.default_rng(1)
    for p in (2, 3, 5, 8, 13):
        for _ in range(100):
            a = rng.integers(0, 2, (p, 2, 3), dtype=np.uint8)
            for n in range(1, p):
                expected = np.array_equal(np.pad(a[:n], [(0, p - n), (0, 0), (0, 0)], mode="reflect"), a)
                assert upgrade_module._mirrors(a, n) == expected, (a, n)


def test_a_size_that_does_not_reproduce_falls_back_to_the_whole_patch(old_store, tmp_path, monkeypatch):
    def wrong(patches, p, done=None):
        for _ in patches:
            pass
        return 92, 93

    monkeypatch.setattr(upgrade_module, "content_size", wrong)
    new = tmp_path / "new.zarr"
    assert [d.content_size for d in upgrade(old_store, new, progress=False, shard_size=4)] == [[P, P], [P, P]]
    assert_exact(old_store, new, "pcam")
    assert verify_store(new, progress=False).sound


KILLED = """
import sys
from histokt.store import upgrade as u
real, calls = u.write_shard, []
def write_shard(*args, **kw):
    out = real(*args, **kw)
    calls.append(1)
    if len(calls) == 2:
        print("ready", flush=True)
        sys.stdin.read()  # blocks until the test kills us
    return out
u.write_shard = write_shard
u.upgrade(sys.argv[1], sys.argv[2], progress=False, shard_size=4)
"""


def test_a_killed_upgrade_leaves_nothing_visible_and_resumes(old_store, tmp_path):
    new = tmp_path / "new.zarr"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(old_store), str(new)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert child.stdout.readline() == "ready\n"  # crc's second shard is written: mid-dataset
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert list_datasets(new) == []
    (work,) = [p for p in new.iterdir() if p.name.startswith(".upgrade-crc-")]
    assert work.name.endswith(f"-{child.pid}")

    assert [d.status for d in upgrade(old_store, new, progress=False, shard_size=4)] == ["upgraded", "upgraded"]
    assert not work.exists()
    clean = tmp_path / "clean.zarr"
    upgrade(old_store, clean, progress=False, shard_size=4)
    assert_same_store(new, clean)


def one_line_error(capsys, *args):
    code = main(["store", "upgrade", *map(str, args), "--no-progress"])
    out = capsys.readouterr()
    assert code == 2, out
    assert out.err.count("\n") == 1 and out.err.startswith("histokt store: error: "), out.err
    return out.err


def test_bad_inputs_are_one_line_errors_and_publish_nothing(old_store, tmp_path, capsys):
    new = tmp_path / "new.zarr"
    assert "no such store" in one_line_error(capsys, tmp_path / "absent", new)
    assert "NEW is the store OLD itself" in one_line_error(capsys, old_store, old_store)
    assert "NEW lies inside the store OLD" in one_line_error(capsys, old_store, old_store / "new")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    assert "exists but is not a zarr store" in one_line_error(capsys, old_store, tmp_path / "junk")
    assert not new.exists()

    broken = tmp_path / "broken.zarr"
    shutil.copytree(old_store, broken)
    first = chunk_file(broken / "crc" / "test" / "images", 1)
    first.rename(tmp_path / "kept")
    assert f"{first}: is missing (patch 1)" in one_line_error(capsys, broken, new)
    assert not new.exists()  # created by this run, removed with nothing in it
    (tmp_path / "kept").rename(first)
    missing = chunk_file(broken / "pcam" / "valid" / "images", 2)
    missing.unlink()

    write_v2_dataset(new, "other", {"train": (np.zeros((2, 5, 5, 3), np.uint8), labels_of(2))}, 16)
    assert f"{missing}: is missing" in one_line_error(capsys, broken, new)
    assert list_datasets(new) == ["crc", "other"]  # crc, sound, was published before pcam failed
    assert not [p for p in new.iterdir() if p.name.startswith(".")]  # nor any work folder
    missing.write_bytes(read_v1_patch(old_store / "pcam" / "valid" / "images", 2, P).tobytes()[:-1])
    err = one_line_error(capsys, broken, new)
    assert f"{missing}: has {P * P * 3 - 1} bytes, a 272 px patch has {P * P * 3} (patch 2)" in err
    assert list_datasets(new) == ["crc", "other"]
    assert not [p for p in new.iterdir() if p.name.startswith(".")]

    write_v2_dataset(tmp_path / "taken.zarr", "pcam", {"train": (np.zeros((2, 5, 5, 3), np.uint8), labels_of(2))}, 16)
    assert "holds another dataset 'pcam'" in one_line_error(capsys, old_store, tmp_path / "taken.zarr")
    assert list_datasets(tmp_path / "taken.zarr") == ["pcam"]
