"""Checkpoints a resume can trust: written atomically, the previous one kept, loaded weights-only.

A save writes a temp file in the run directory, fsyncs it, moves the current ``last.pt`` to
``previous.pt`` and renames the temp file to ``last.pt``. A kill at any point leaves at least one
complete checkpoint; a full disk fails on the temp file and leaves both intact. A load takes the newest
file that loads; a truncated or corrupt ``last.pt`` falls back to ``previous.pt``.
"""

import os
import random

import numpy as np
import torch

from histokt import atomic

LAST, PREVIOUS = "last.pt", "previous.pt"


def save(run_dir, state: dict) -> None:
    last = run_dir / LAST
    with atomic.atomic_path(last) as tmp:
        torch.save(state, tmp)
        if last.exists():  # keep the one good checkpoint until the new one is complete
            os.replace(last, run_dir / PREVIOUS)


def save_weights(path, state: dict) -> None:
    """best.pt and friends: ``{"model": state_dict, ...}``, atomically."""
    with atomic.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path) -> dict:
    """Weights-only load (never full unpickling); raises on a truncated or corrupt file."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_latest(run_dir) -> tuple[dict | None, list[str]]:
    """The newest checkpoint that loads, and a note for each one that did not."""
    notes = []
    for name in (LAST, PREVIOUS):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            return load(path), notes
        except Exception as exc:  # a damaged file: any unpickling error means "use the older one"
            notes.append(f"{path}: unreadable checkpoint ({type(exc).__name__}: {str(exc)[:120]}); skipped")
    return None, notes


def rng_state() -> dict:
    """Every RNG the training process uses, as tensors and ints (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "python": _py_state_tensor(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(int(x) for x in state["python"].tolist()), gauss))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_tensor() -> torch.Tensor:
    return torch.tensor(random.getstate()[1], dtype=torch.int64)
