"""Checkpoints a resume can trust: written atomically, the previous one kept, loaded weights-only.

A save writes a temp file in the run directory, fsyncs it, moves the current ``last.pt`` to
``previous.pt`` and renames the temp file to ``last.pt``. A kill at any point leaves at least one
complete checkpoint. A full disk or an exceeded quota fails on the temp file, leaves both intact and
raises a one-line UserError naming the checkpoint (histokt.errors.full_disk): free space and run the same
command again, it resumes. A load takes the newest file that loads; a truncated or corrupt ``last.pt``
falls back to ``previous.pt``.
"""

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histokt import atomic
from histokt.errors import FULL_DISK, full_disk

LAST, PREVIOUS = "last.pt", "previous.pt"
_PROBE = 1 << 20  # bytes appended to a failed checkpoint's temp file to learn whether the disk is full


def save(run_dir: Path, state: dict[str, Any]) -> None:
    last = run_dir / LAST
    with full_disk_names(last), atomic.atomic_path(last) as tmp:
        _write(state, tmp)
        if last.exists():  # keep the one good checkpoint until the new one is complete
            os.replace(last, run_dir / PREVIOUS)


def save_weights(path: Path, state: dict[str, Any]) -> None:
    """best.pt and friends: ``{"model": state_dict, ...}``, atomically; a full disk as ``save``."""
    with full_disk_names(path), atomic.atomic_path(path) as tmp:
        _write(state, tmp)


@contextlib.contextmanager
def full_disk_names(path: Path) -> Iterator[None]:
    """A full disk or an exceeded quota inside the block becomes the one-line UserError of
    histokt.errors.full_disk naming ``path`` (the file being written, not its temp file); other errors pass."""
    try:
        yield
    except OSError as exc:
        error = full_disk(OSError(exc.errno, exc.strerror), path)
        if error is None:
            raise
        raise error from None


def _write(state: dict[str, Any], tmp: Path) -> None:
    """torch.save into a file object we own, flushed and fsynced. Given a path, torch's own writer turns a
    full disk into ``RuntimeError: [enforce fail at inline_container.cc:...] unexpected pos ...`` and the errno
    is lost; through a Python file the OSError (ENOSPC, EDQUOT) surfaces. Should a RuntimeError come all the
    same, a probe write to the temp file tells whether the disk is full."""
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except RuntimeError:
        _raise_if_full(tmp)
        raise


def _raise_if_full(tmp: Path) -> None:
    """Raise the OSError of a full disk or quota if ``tmp`` cannot grow by a MiB (the failed write's partial
    file still holds its space, so a disk that filled up is still full here); return otherwise."""
    try:
        with open(tmp, "ab") as f:
            f.write(bytes(_PROBE))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if exc.errno in FULL_DISK:
            raise OSError(exc.errno, os.strerror(exc.errno)) from None


def load(path: Path) -> dict[str, Any]:
    """Weights-only load (never full unpickling); raises on a truncated or corrupt file."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_latest(run_dir: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The newest checkpoint that loads, and a note for each one that did not."""
    notes: list[str] = []
    for name in (LAST, PREVIOUS):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            return load(path), notes
        except Exception as exc:  # a damaged file: any unpickling error means "use the older one"
            notes.append(f"{path}: unreadable checkpoint ({type(exc).__name__}: {str(exc)[:120]}); skipped")
    return None, notes


def rng_state() -> dict[str, Any]:
    """Every RNG the training process uses, as tensors, ints, floats and None (weights_only-loadable).

    Python's and numpy's states include the cached second value of their last Gaussian pair
    (``random.gauss``, ``np.random.standard_normal``): without it the next draw after a resume would differ."""
    _, keys, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = _np_state()
    state: dict[str, Any] = {
        "python": torch.tensor(keys, dtype=torch.int64),
        "python_gauss": py_gauss,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved. A checkpoint from before the Gaussian caches were saved restores as
    it did then: Python's current cached value kept, numpy's cleared."""
    version, _, py_gauss = random.getstate()
    py_gauss = state.get("python_gauss", py_gauss)
    random.setstate((version, tuple(int(x) for x in state["python"].tolist()), py_gauss))
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (
            "MT19937",
            keys,
            int(state["numpy_pos"]),
            int(state.get("numpy_has_gauss", 0)),
            float(state.get("numpy_gauss", 0.0)),
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _np_state() -> tuple[str, np.ndarray, int, int, float]:
    """numpy's legacy global state as its 5-tuple (get_state's default, legacy=True)."""
    state = np.random.get_state(legacy=True)
    if not isinstance(state, tuple):  # only a non-MT19937 bit generator gives a dict
        raise TypeError("numpy's global RandomState does not use MT19937")
    return state
