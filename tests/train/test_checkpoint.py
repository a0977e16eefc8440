"""Checkpoints: atomic rotation, fallback from a damaged last.pt, a full disk (or quota) leaves the old one intact
and is named in one line."""

import errno
import os
import re

import pytest
import torch

from histokt.errors import FULL_DISK, UserError
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


@pytest.mark.parametrize("code,name", [(errno.ENOSPC, "ENOSPC"), (errno.EDQUOT, "EDQUOT")])
def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, code, name):
    checkpoint.save(tmp_path, state(1))
    before = (tmp_path / "last.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        f.truncate(10)  # pretend the device filled up halfway through
        raise OSError(code, os.strerror(code))  # as a failed write() raises it: no file named

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError) as caught:
        checkpoint.save(tmp_path, state(2))
    assert str(caught.value) == (
        f"{tmp_path / 'last.pt'}: {FULL_DISK[code]}; free space or raise the quota, then run the same command "
        "again: it resumes"
    )
    assert f"({name})" in str(caught.value) and "\n" not in str(caught.value)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path / 'best.pt'))}: .*\({name}\)"):
        checkpoint.save_weights(tmp_path / "best.pt", state(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_other_errors_of_a_save_pass_unchanged(tmp_path, monkeypatch):
    def broken(obj, f, *a, **kw):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError) as caught:
        checkpoint.save(tmp_path, state(1))
    assert caught.value.errno == errno.EIO and not isinstance(caught.value, UserError)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmpfs):
    """A 2 MiB tmpfs."""
    return tmpfs.mount(2)


def test_a_real_full_disk_is_named_and_keeps_the_previous_checkpoint(small_disk):
    """On a real full tmpfs: torch.save given a path would say 'unexpected pos' (no errno); ours names ENOSPC."""
    checkpoint.save(small_disk, state(1))
    before = (small_disk / "last.pt").read_bytes()
    big = {"model": {"w": torch.zeros(1 << 20)}, "step": 2}  # 4 MiB: more than the disk holds
    with pytest.raises(RuntimeError, match="unexpected pos"):  # what a cell printed before, as a traceback
        torch.save(big, small_disk / "plain.pt")
    (small_disk / "plain.pt").unlink()
    with pytest.raises(UserError, match=rf"^{re.escape(str(small_disk / 'last.pt'))}: .*\(ENOSPC\); free space"):
        checkpoint.save(small_disk, big)
    assert (small_disk / "last.pt").read_bytes() == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["last.pt"]


def test_a_runtime_error_on_a_full_disk_is_still_named(small_disk, monkeypatch):
    """Should torch.save hide the errno even when writing to our file, a probe write finds the full disk; on a
    disk with room the RuntimeError passes unchanged."""
    checkpoint.save(small_disk, state(1))
    before = (small_disk / "last.pt").read_bytes()

    def enforce_fail(obj, f, *a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", enforce_fail)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        checkpoint.save(small_disk, state(2))  # 2 MiB, most of it free: not a full disk
    assert sorted(p.name for p in small_disk.iterdir()) == ["last.pt"]
    ballast = small_disk / "ballast"
    with pytest.raises(OSError), open(ballast, "wb") as f:  # fill the disk
        f.write(bytes(4 << 20))
    with pytest.raises(UserError, match=rf"^{re.escape(str(small_disk / 'last.pt'))}: .*\(ENOSPC\)"):
        checkpoint.save(small_disk, state(2))
    assert (small_disk / "last.pt").read_bytes() == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["ballast", "last.pt"]


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


def _draws():
    """A few values from every generator training uses, Gaussians included (their second value is cached)."""
    import random

    import numpy as np

    return (
        random.random(),
        random.gauss(0.0, 1.0),
        random.gauss(0.0, 1.0),
        float(np.random.standard_normal()),
        float(np.random.standard_normal()),
        float(np.random.rand()),
        torch.randn(3).tolist(),
        torch.rand(2).tolist(),
    )


def test_resume_restores_every_generator_including_cached_gaussians(tmp_path):
    import random

    import numpy as np

    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    _draws()  # an odd number of Gaussians from each: the next one is a cached value inside the state
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    assert random.getstate()[2] is not None and np.random.get_state()[3] == 1
    checkpoint.save(tmp_path, {"rng": checkpoint.rng_state()})
    expected = _draws()
    random.seed(99)  # a fresh process: other states, another cached Gaussian
    np.random.seed(99)
    torch.manual_seed(99)
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    assert _draws() != expected
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "last.pt")["rng"])
    assert _draws() == expected


def test_no_cached_gaussian_is_restored_as_none(tmp_path):
    import random

    import numpy as np

    random.seed(1)
    np.random.seed(1)
    checkpoint.save(tmp_path, {"rng": checkpoint.rng_state()})  # nothing cached yet
    expected = _draws()
    random.gauss(0.0, 1.0)  # leaves a cached value that the restore must drop
    np.random.standard_normal()
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "last.pt")["rng"])
    assert random.getstate()[2] is None and np.random.get_state()[3] == 0
    assert _draws() == expected


def test_a_checkpoint_from_before_the_cached_gaussians_still_restores_the_streams(tmp_path):
    import random

    import numpy as np

    random.seed(2)
    np.random.seed(3)
    torch.manual_seed(4)
    old = {k: v for k, v in checkpoint.rng_state().items() if "gauss" not in k}
    checkpoint.save(tmp_path, {"rng": old})
    expected = (random.random(), float(np.random.rand()), torch.rand(2).tolist())
    random.random(), np.random.rand(), torch.rand(2)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "last.pt")["rng"])
    assert (random.random(), float(np.random.rand()), torch.rand(2).tolist()) == expected


def test_three_saves_keep_the_last_two(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, state(step))
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 3
    assert checkpoint.load(tmp_path / "previous.pt")["step"] == 2
    assert torch.equal(checkpoint.load_latest(tmp_path)[0]["model"]["w"], torch.full((3,), 3.0))


def test_no_checkpoint_or_none_loadable(tmp_path):
    assert checkpoint.load_latest(tmp_path) == (None, [])
    checkpoint.save(tmp_path, state(1))
    checkpoint.save(tmp_path, state(2))
    for name in ("last.pt", "previous.pt"):
        (tmp_path / name).write_bytes(b"garbage")
    loaded, notes = checkpoint.load_latest(tmp_path)
    assert loaded is None and len(notes) == 2
    assert "last.pt" in notes[0] and "previous.pt" in notes[1]


def test_save_weights_writes_one_file_atomically(tmp_path):
    checkpoint.save_weights(tmp_path / "best.pt", {"model": {"w": torch.ones(2)}, "epoch": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
    loaded = checkpoint.load(tmp_path / "best.pt")
    assert loaded["epoch"] == 4 and torch.equal(loaded["model"]["w"], torch.ones(2))


PICKLE_CALLS = []


def _record_unpickling(tag):
    PICKLE_CALLS.append(tag)
    return tag


def test_weights_only_even_when_the_environment_turns_torchs_default_off(tmp_path, monkeypatch):
    class Payload:
        def __reduce__(self):
            return (_record_unpickling, ("ran",))

    torch.save({"model": Payload()}, tmp_path / "last.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # flips torch.load's default, not an explicit True
    PICKLE_CALLS.clear()
    loaded, notes = checkpoint.load_latest(tmp_path)
    assert loaded is None and PICKLE_CALLS == [] and "unreadable checkpoint" in notes[0]


def test_a_checkpoint_written_on_a_gpu_loads_onto_the_cpu(tmp_path, monkeypatch):
    import torch.serialization

    with monkeypatch.context() as m:  # record the tensor's location as cuda:0, as a GPU rank would
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        checkpoint.save(tmp_path, state(3))
    loaded, notes = checkpoint.load_latest(tmp_path)
    assert notes == [] and loaded["model"]["w"].device.type == "cpu"
    assert torch.equal(loaded["model"]["w"], torch.full((3,), 3.0))


def test_a_kill_between_the_two_renames_leaves_previous_pt_which_loads(tmp_path):
    checkpoint.save(tmp_path, state(1))
    checkpoint.save(tmp_path, state(2))
    (tmp_path / "last.pt").unlink()  # save moved last.pt to previous.pt, then died before the temp file's rename
    loaded, notes = checkpoint.load_latest(tmp_path)
    assert loaded["step"] == 1 and notes == []


def test_the_note_names_the_error_and_keeps_its_message_short(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, state(1))
    message = "0123456789" * 20

    def broken(path):
        raise RuntimeError(message)

    monkeypatch.setattr(checkpoint, "load", broken)
    loaded, notes = checkpoint.load_latest(tmp_path)
    assert loaded is None
    assert notes == [f"{tmp_path / 'last.pt'}: unreadable checkpoint (RuntimeError: {message[:120]}); skipped"]


def test_cuda_generators_are_saved_and_restored_when_a_gpu_is_present(monkeypatch):
    cuda_states = [torch.arange(4, dtype=torch.uint8), torch.arange(4, 8, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: cuda_states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    saved = checkpoint.rng_state()
    assert saved["cuda"] is cuda_states
    checkpoint.set_rng_state(saved)
    assert restored == [cuda_states]
    restored.clear()
    checkpoint.set_rng_state({k: v for k, v in saved.items() if k != "cuda"})  # written on a CPU-only machine
    assert restored == []


def test_cuda_state_is_left_alone_without_a_gpu(monkeypatch):
    def no_gpu(*args):
        raise AssertionError("CUDA touched on a machine without a GPU")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", no_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", no_gpu)
    saved = checkpoint.rng_state()
    assert "cuda" not in saved
    checkpoint.set_rng_state({**saved, "cuda": [torch.zeros(4, dtype=torch.uint8)]})  # written on a GPU machine


def test_an_old_checkpoint_keeps_pythons_cached_gaussian_and_clears_numpys(tmp_path):
    import random

    import numpy as np

    random.seed(8)
    np.random.seed(9)
    old = {k: v for k, v in checkpoint.rng_state().items() if "gauss" not in k}
    saved_numpy = np.random.get_state()
    checkpoint.save(tmp_path, {"rng": old})
    expected_normal = float(np.random.standard_normal())  # a fresh pair: its second value is now cached
    random.gauss(0.0, 1.0)
    cached = random.getstate()[2]
    assert cached is not None and np.random.get_state()[3] == 1
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "last.pt")["rng"])
    assert random.getstate()[2] == cached
    restored_numpy = np.random.get_state()
    assert restored_numpy[0] == saved_numpy[0] and np.array_equal(restored_numpy[1], saved_numpy[1])
    assert restored_numpy[2:] == saved_numpy[2:] == (saved_numpy[2], 0, 0.0)
    assert float(np.random.standard_normal()) == expected_normal


def test_a_global_numpy_generator_other_than_mt19937_is_refused():
    import numpy as np

    original = np.random.get_bit_generator()
    np.random.set_bit_generator(np.random.PCG64(0))
    try:
        with (
            pytest.warns(RuntimeWarning),
            pytest.raises(TypeError, match=r"^numpy's global RandomState does not use MT19937$"),
        ):
            checkpoint.rng_state()
    finally:
        np.random.set_bit_generator(original)
