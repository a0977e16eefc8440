"""Normalization constants: a dataset's own statistics (computed once, cached in the store) or fixed ones.

HistoKT's rule (src/adas/get_norm.py): mean = mean of the per-image channel means; std =
sqrt(sum over images of the per-image mean squared deviation from that global mean / (N - 1)), on [0, 1]
values of the train split. Large splits use an evenly spaced sample of at most ``MAX_PATCHES`` patches.
"""

import json
from pathlib import Path

import numpy as np

from histokt import atomic
from histokt.errors import UserError
from histokt.store.schema import PatchReader, open_attrs

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NONE = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
MAX_PATCHES = 4096


def compute_stats(reader: PatchReader, n: int, max_patches: int = MAX_PATCHES):
    if n < 2:
        raise UserError(f"{reader.path}: too few patches ({n}) to compute normalization statistics")
    idx = np.unique(np.linspace(0, n - 1, min(n, max_patches)).round().astype(int))
    means = np.stack([reader.read(int(i)).reshape(-1, 3).mean(axis=0) / 255.0 for i in idx])
    mean = means.mean(axis=0)
    sq = [((reader.read(int(i)).reshape(-1, 3) / 255.0 - mean) ** 2).mean(axis=0) for i in idx]
    std = np.sqrt(np.sum(sq, axis=0) / (len(idx) - 1))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std), len(idx)


def dataset_stats(store, dataset: str) -> tuple[tuple, tuple]:
    """The train split's statistics, cached in the dataset's attrs (``norm``) after the first call."""
    attrs = open_attrs(store, dataset)
    cached = attrs.get("norm")
    if cached:
        return tuple(cached["mean"]), tuple(cached["std"])
    n = int(attrs["counts"]["train"])
    mean, std, used = compute_stats(PatchReader(store, dataset, "train"), n)
    _cache(Path(store) / dataset / "zarr.json", {"mean": mean, "std": std, "patches": used, "rule": "histokt get_norm"})
    return mean, std


def _cache(meta_path: Path, norm: dict) -> None:
    """Add ``norm`` to the dataset's attrs with an atomic rewrite (concurrent cells write equal values)."""
    meta = json.loads(meta_path.read_text())
    meta.setdefault("attributes", {})["norm"] = norm
    atomic.write_bytes(meta_path, json.dumps(meta, indent=2).encode())


def norm_constants(store, dataset: str, choice: str) -> tuple[tuple, tuple]:
    """--norm: 'dataset' (this dataset's), 'imagenet', 'none', or the name of another dataset in the store
    (e.g. the source dataset, as HistoKT normalized random-init transfers)."""
    if choice == "imagenet":
        return IMAGENET
    if choice == "none":
        return NONE
    return dataset_stats(store, dataset if choice == "dataset" else choice)
