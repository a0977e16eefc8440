"""The standardized patch store: its schema, and the primitives that read it.

Schema, format ``histokt-patches/2`` (a contract; later stages and other tools read it, see README "Store
schema"):

    STORE/zarr.json                  root group
    STORE/<dataset>/                 group; attrs below
    STORE/<dataset>/sources          1-D strings: source image path relative to the raw dir
    STORE/<dataset>/<split>/images   uint8 [N, H, W, 3]: the patches' content, H, W = attrs content_size,
                                     sharded: SHARD_SIZE patches per file, CRC32C per patch and per index
                                     (histokt.store.shards), shard files c.<s>.0.0.0 flat in the folder
    STORE/<dataset>/<split>/labels   int64 [N], or uint8 [N, C] for multi-label datasets
    STORE/<dataset>/<split>/source_id  int64 [N], index into sources
    STORE/<dataset>/<split>/box      int64 [N, 4], (x0, y0, x1, y1) in the rescaled, padded source

Dataset attrs: classes, multi_label, mpp_native, mpp_source, mpp_target, patch_size, content_size [H, W],
shard_size, stride, filter (its parameters; null where --no-filter kept every patch), split_rule, split_seed,
split_plan, group_rule, counts {split: N}, rejected [{path, reason}], warnings, card {card, options},
fingerprint, histokt_version, format; max_per_class where a subset was asked for.

No padding is stored: where every kept window of a dataset is smaller than the patch (PCam's 93 px, CRC's
112 px at 1 µm/px), ``content_size`` is that size and the reader mirror-pads each patch to ``patch_size``
exactly as ingest pads a small image before tiling (``shards.pad_on_read``): the pixels a model sees are
those of a stored padded patch. Datasets of large images have content_size == [patch_size, patch_size].
A dataset appears in the store only by one atomic directory rename, so readers never see it half-written.

Format 1 (one uncompressed chunk file per padded patch) is not read; ``histokt store upgrade`` converts it.
"""

import json
from pathlib import Path

import numpy as np
import zarr

from histokt.errors import UserError
from histokt.store.shards import ShardDamaged, ShardedReader, StoreDamaged, pad_on_read

FORMAT = "histokt-patches/2"
FORMAT_1 = "histokt-patches/1"
SPLITS = ("train", "valid", "test")


def staging_dir(store, dataset: str) -> Path:
    """Work folder of an unfinished dataset: a hidden sibling of the store (zarr warns about foreign
    folders inside a hierarchy), on the same filesystem so finished files move in by rename."""
    store = Path(store).absolute()
    return store.parent / f".{store.name}.staging" / dataset


def images_dir(store, dataset: str, split: str) -> Path:
    return Path(store) / dataset / split / "images"


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


def check_format(store, dataset: str, attrs: dict) -> None:
    """A clear one-line error for a dataset this version does not read (format 1: with its upgrade)."""
    found = attrs.get("format")
    if found == FORMAT:
        return
    if found == FORMAT_1:
        raise UserError(
            f"{store}/{dataset}: store format {FORMAT_1} (one file per patch), this histokt reads {FORMAT}; "
            f"convert the store with 'histokt store upgrade {store} NEW_STORE', or standardize the dataset again"
        )
    raise UserError(
        f"{store}/{dataset}: store format {found!r}, this histokt reads {FORMAT!r}; standardize it again "
        f"with this version"
    )


def open_attrs(store, dataset: str) -> dict:
    """Attrs of a finished dataset of this format, or a clear error naming what the store does hold."""
    if not (Path(store) / "zarr.json").is_file():
        raise UserError(f"{store}: not a histokt store (run 'histokt standardize' first)")
    attrs = dataset_attrs(store, dataset)
    if attrs is None:
        have = ", ".join(list_datasets(store)) or "none"
        raise UserError(f"{store}: no dataset {dataset!r} (datasets in this store: {have})")
    check_format(store, dataset, attrs)
    return attrs


def repair_hint(store, dataset: str) -> str:
    """What to run about a damaged dataset (the card name comes from its attrs where readable)."""
    card = (dataset_attrs(store, dataset) or {}).get("card", {}).get("card", "CARD")
    return (
        f"list the damage with 'histokt verify {store} --dataset {dataset}', and re-create the damaged shards "
        f"from the raw data with 'histokt standardize --dataset {card} --raw RAW --store {store} --name {dataset} "
        f"--repair' (with the dataset's original options)"
    )


class PatchReader:
    """Random access to one split's patches at the full patch size, opened lazily (safe to pickle into
    DataLoader workers): one ``pread`` and one CRC32C check per patch, then mirror padding where the
    dataset stores content smaller than the patch. Damage is a ``StoreDamaged`` naming the dataset, the
    split, the shard file and what to run, never zeros."""

    def __init__(self, store, dataset: str, split: str):
        self._setup(Path(store), dataset, split)

    def _setup(self, store: Path, dataset: str, split: str) -> None:
        self.store, self.dataset, self.split = store, dataset, split
        self.path = store / dataset / split
        self._shards = ShardedReader(self.path / "images")
        self._patch_size: int | None = None

    def __getstate__(self):
        return {"store": self.store, "dataset": self.dataset, "split": self.split}

    def __setstate__(self, state):
        self._setup(state["store"], state["dataset"], state["split"])

    @property
    def patch_size(self) -> int:
        if self._patch_size is None:
            attrs = dataset_attrs(self.store, self.dataset) or {}
            self._patch_size = int(attrs.get("patch_size") or self._shards.shape[1])
        return self._patch_size

    @property
    def content_shape(self) -> tuple[int, int]:
        """(H, W) of the stored content."""
        return self._shards.shape[1], self._shards.shape[2]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, P, P, 3): what ``read`` returns."""
        return len(self._shards), self.patch_size, self.patch_size, 3

    def __len__(self) -> int:
        return len(self._shards)

    def read(self, index: int) -> np.ndarray:
        """The (P, P, 3) uint8 patch ``index`` (read-only where no padding is applied)."""
        try:
            content = self._shards.read(index)
        except ShardDamaged as exc:
            raise StoreDamaged(
                f"dataset {self.dataset!r}, split {self.split}, patch {index}: {exc.path}: {exc.problem}; the "
                f"store is damaged: {repair_hint(self.store, self.dataset)}"
            ) from None
        return pad_on_read(content, self.patch_size)

    def read_content(self, index: int) -> np.ndarray:
        """The stored (H, W, 3) content of patch ``index``, unpadded (checksum verified)."""
        return self._shards.read(index)

    def read_meta(self, name: str) -> np.ndarray:
        return np.asarray(zarr.open_array(str(self.path / name), mode="r")[...])

    def close(self) -> None:
        self._shards.close()
