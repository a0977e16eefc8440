"""Checkpoints: atomic rotation, fallback from a damaged last.pt, a full disk leaves the old one intact."""

import errno

import pytest
import torch

from histokt.train import checkpoint


def state(step):
    return {"model": {"w": torch.full((3,), float(step))}, "step": step}


def test_save_rotates_and_loads_newest(tmp_path):
    checkpoint.save(tmp_path, state(1))
    checkpoint.save(tmp_path, state(2))
    assert checkpoint.load(tmp_path / "previous.pt")["step"] == 1
    loaded, notes = checkpoint.load_latest(tmp_path)
    assert loaded["step"] == 2 and notes == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]  # no temp files left


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_last_falls_back_to_previous(tmp_path, damage):
    checkpoint.save(tmp_path, state(1))
    checkpoint.save(tmp_path, state(2))
    last = tmp_path / "last.pt"
    data = last.read_bytes()
    last.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"x" * 100, "empty": b""}[damage])
    loaded, notes = checkpoint.load_latest(tmp_path)
    assert loaded["step"] == 1
    assert len(notes) == 1 and "last.pt" in notes[0] and "skipped" in notes[0]


def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, state(1))
    before = (tmp_path / "last.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        with open(f, "ab") as fh:  # pretend the device filled up halfway through
            fh.truncate(10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, state(2))
    assert (tmp_path / "last.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_rng_state_round_trips_through_weights_only(tmp_path):
    import random

    import numpy as np

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    checkpoint.save(tmp_path, {"rng": checkpoint.rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "last.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"model": Evil()}, tmp_path / "last.pt")
    loaded, notes = checkpoint.load_latest(tmp_path)
    assert loaded is None and "unreadable checkpoint" in notes[0]
