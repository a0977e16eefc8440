"""The standardized patch store: its schema, and the few primitives that write and read it.

Schema (a contract; later stages and other tools read it, see README "Store schema"):

    STORE/<dataset>/                 group; attrs below
    STORE/<dataset>/sources          1-D strings: source image path relative to the raw dir
    STORE/<dataset>/<split>/images   uint8 [N, P, P, 3], one uncompressed chunk per patch
    STORE/<dataset>/<split>/labels   int64 [N], or uint8 [N, C] for multi-label datasets
    STORE/<dataset>/<split>/source_id  int64 [N], index into sources
    STORE/<dataset>/<split>/box      int64 [N, 4], (x0, y0, x1, y1) in the rescaled, padded source

Dataset attrs: classes, multi_label, mpp_native, mpp_source, mpp_target, patch_size, stride, filter,
split_rule, split_seed, split_plan, group_rule, counts {split: N}, rejected [{path, reason}], warnings,
card {card, options}, fingerprint, histokt_version, format; max_per_class where a subset was asked for.

Images use one chunk per patch with no compressor: histology patches compress by only ~10% losslessly
(measured), and a raw chunk is one file read, so the reader can fetch a random patch in ~40 µs instead of
zarr's ~0.5 ms per call (benchmarks/reader.py). A dataset appears in the store only by one atomic
directory rename, so readers never see it half-written.
"""

import json
from pathlib import Path

import numpy as np
import zarr

from histokt.errors import UserError

FORMAT = "histokt-patches/1"
SPLITS = ("train", "valid", "test")


def staging_dir(store, dataset: str) -> Path:
    """Work folder of an unfinished dataset: a hidden sibling of the store (zarr warns about foreign
    folders inside a hierarchy), on the same filesystem so finished files move in by rename."""
    store = Path(store).absolute()
    return store.parent / f".{store.name}.staging" / dataset


def patch_array(path, n: int, patch_size: int) -> zarr.Array:
    """Create the images array at ``path``: one raw (uncompressed) chunk per patch."""
    return zarr.create_array(
        store=str(path),
        shape=(n, patch_size, patch_size, 3),
        chunks=(1, patch_size, patch_size, 3),
        dtype="uint8",
        compressors=None,
        fill_value=0,
        dimension_names=("n", "y", "x", "c"),
        zarr_format=3,
        overwrite=True,
    )


def chunk_file(array_dir: Path, index: int) -> Path:
    """Where the zarr v3 default chunk-key encoding puts the chunk of patch ``index``."""
    return chunk_dir(array_dir, index) / "0" / "0" / "0"


def chunk_dir(array_dir: Path, index: int) -> Path:
    """The folder holding only patch ``index``'s chunk: moving it moves the patch."""
    return Path(array_dir) / "c" / str(index)


def write_chunk(array_dir: Path, index: int, patch: np.ndarray) -> None:
    """Write one patch of a ``patch_array`` array as its chunk file: with the plain ``bytes`` codec a
    chunk is the C-order bytes (the same bytes zarr writes, 2x faster than ``Array.__setitem__``).
    Not atomic on its own: staging parts are only trusted once their manifest exists."""
    path = chunk_file(array_dir, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(np.ascontiguousarray(patch, dtype=np.uint8).data)


def small_array(group: zarr.Group, name: str, data: np.ndarray) -> None:
    chunks = (max(1, min(len(data), 65536)),) + data.shape[1:]
    arr = group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype, overwrite=True)
    if len(data):
        arr[...] = data


def string_array(group: zarr.Group, name: str, values: list[str]) -> None:
    arr = group.create_array(
        name, shape=(len(values),), chunks=(max(1, min(len(values), 65536)),), dtype=str, overwrite=True
    )
    if values:
        arr[...] = np.array(values, dtype=object)


def dataset_attrs(store, dataset: str) -> dict | None:
    """The attrs of a finished dataset, read from its metadata file alone; None where it is absent."""
    meta = Path(store) / dataset / "zarr.json"
    try:
        return json.loads(meta.read_text()).get("attributes", {})
    except FileNotFoundError:
        return None


def list_datasets(store) -> list[str]:
    root = Path(store)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "zarr.json").is_file()
    )


class StoreDamaged(UserError):
    """A patch chunk file of a finished dataset is missing or of the wrong size. Every kept patch is
    written before a dataset appears, so this is always damage (a deleted or truncated file), never an
    unwritten patch: the dataset must be standardized again."""


class PatchReader:
    """Random access to one split's patches, opened lazily (safe to pickle into DataLoader workers).

    Reads raw chunk files directly where the images array has the layout ``patch_array`` writes, and
    falls back to zarr for any other layout (e.g. a store re-chunked or compressed by another tool).
    """

    def __init__(self, store, dataset: str, split: str):
        self.path = Path(store) / dataset / split
        self._array: zarr.Array | None = None
        self._fast: bool | None = None

    def __getstate__(self):
        return {"path": self.path, "_array": None, "_fast": None}

    def _open(self):
        meta = json.loads((self.path / "images" / "zarr.json").read_text())
        self.shape = tuple(meta["shape"])
        codecs = [c["name"] for c in meta.get("codecs", [])]
        grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
        enc = meta.get("chunk_key_encoding", {})
        self._images = str(self.path / "images")
        self._fast = (
            codecs == ["bytes"]
            and meta["data_type"] == "uint8"
            and list(grid) == [1, *self.shape[1:]]
            and enc.get("name") == "default"
            and enc.get("configuration", {}).get("separator", "/") == "/"
        )
        self._patch_bytes = int(np.prod(self.shape[1:]))
        if not self._fast:
            self._array = zarr.open_array(str(self.path / "images"), mode="r")

    def __len__(self):
        if self._fast is None:
            self._open()
        return self.shape[0]

    def read(self, index: int) -> np.ndarray:
        """The (P, P, 3) uint8 patch ``index``."""
        if self._fast is None:
            self._open()
        if not 0 <= index < self.shape[0]:
            raise IndexError(f"patch {index} out of range for {self.path} ({self.shape[0]} patches)")
        if self._array is not None:  # not the fast layout: zarr reads it
            return np.asarray(self._array[index])
        path = f"{self._images}/c/{index}/0/0/0"  # an f-string path: pathlib costs ~20 % of a read here
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except FileNotFoundError:  # never a patch left unwritten (each kept patch is written): damage
            raise self._damaged(index, path, "is missing") from None
        if data.size != self._patch_bytes:
            raise self._damaged(index, path, f"is truncated ({data.size} of {self._patch_bytes} bytes)")
        return data.reshape(self.shape[1:])

    def _damaged(self, index: int, path: str, what: str) -> StoreDamaged:
        store, dataset, split = self.path.parent.parent, self.path.parent.name, self.path.name
        card = (dataset_attrs(store, dataset) or {}).get("card", {}).get("card", "CARD")
        return StoreDamaged(
            f"dataset {dataset!r}, split {split}, patch {index}: {path} {what}; the store is damaged: "
            f"standardize the dataset again with --overwrite (histokt standardize --dataset {card} --raw RAW "
            f"--store {store} --name {dataset} --overwrite, with its original options)"
        )

    def read_meta(self, name: str) -> np.ndarray:
        return np.asarray(zarr.open_array(str(self.path / name), mode="r")[...])
