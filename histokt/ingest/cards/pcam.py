"""PatchCamelyon (PCam): 327,680 96x96 patches of Camelyon16 level 2 (10x), binary tumour labels, in HDF5.

Raw layout (``raw`` is the folder holding the six files, as shipped on zenodo 2546921 or gunzipped)::

    camelyonpatch_level_2_split_{train,valid,test}_x.h5[.gz]   key "x": (N, 96, 96, 3) uint8
    camelyonpatch_level_2_split_{train,valid,test}_y.h5[.gz]   key "y": (N, 1, 1, 1), label = y[i, 0, 0, 0]

Other files (``*_meta.csv``) are ignored. h5py cannot read gzip, so a file present only as ``.h5.gz`` is
decompressed once, streaming, into a cache folder (option ``cache``) and reused while the record of the
``.gz`` file's size and mtime still matches. One source per HDF5 row, path ``<x file name>[<row>]``.
"""

import gzip
import os
import random
import re
import shutil
import zlib
from pathlib import Path

import h5py
import numpy as np

from histokt.atomic import atomic_path, read_json, write_json
from histokt.errors import UserError, verify_download
from histokt.ingest.cards.base import Card, CardIndex, Source
from histokt.ingest.decode import BadImage

PARTITIONS = ("train", "valid", "test")
PATCH_SHAPE = (96, 96, 3)
ROW_PATH = re.compile(r"(?P<file>.+)\[(?P<row>\d+)\]")
CHUNK = 16 << 20  # bytes per copy while gunzipping: large enough to stream at disk speed


def file_name(partition: str, kind: str) -> str:
    return f"camelyonpatch_level_2_split_{partition}_{kind}.h5"


class PCam(Card):
    name = "pcam"
    classes = ("non_tumor", "tumor")
    mpp = 0.972
    mpp_source = "HistoKT (eva, THUNDER: 1.0)"
    # The official partitions are patient-disjoint, so each is kept whole.
    split_plan = {p: {p: 1.0} for p in PARTITIONS}
    group_rule = "official split (one group per row)"
    expected_counts = {"train": 262144, "valid": 32768, "test": 32768}
    # per_class: 0 = every row; k = HistoKT's balanced archive: first k per class after a seed-42 shuffle
    #   of the train rows, round(k/5) per class of valid (1000 -> 1000/200), test whole.
    # cache: folder for decompressed .h5.gz files; "" = $HISTOKT_CACHE/pcam or ~/.cache/histokt/pcam.
    OPTION_DEFAULTS = {"per_class": 0, "cache": ""}

    def __init__(self, **options):
        super().__init__(**options)
        self._handles = {}  # x file name -> open h5py dataset, per process (see _x_dataset)
        self._pid = os.getpid()

    # Open HDF5 handles cannot be pickled into workers (torchvision#9195): each process opens its own.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_handles", "_pid")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._handles = {}
        self._pid = os.getpid()

    def check_options(self) -> None:
        k = self.option_values["per_class"]
        if not isinstance(k, int) or k < 0:
            raise UserError(f"card pcam: option per_class={k!r} must be an integer >= 0 (0 = all rows)")

    def _expected(self) -> dict[str, int]:
        k = self.option_values["per_class"]
        if not k:
            return self.expected_counts
        # A balanced subset is the intended count, not a partial download.
        return {"train": 2 * k, "valid": 2 * round(k / 5), "test": 32768}

    # -- index --------------------------------------------------------------------------------------------
    def index(self, raw: Path) -> CardIndex:
        self.require_dir(raw, "the folder holding camelyonpatch_level_2_split_*_{x,y}.h5[.gz]")
        sources = []
        for part in PARTITIONS:
            x_path, y_path = self._shipped(raw, part, "x"), self._shipped(raw, part, "y")
            n = self._check_x(self.local_file(x_path), x_path)
            labels = self._read_y(self.local_file(y_path), y_path)
            if len(labels) != n:
                raise verify_download(
                    self.name, raw, f"{x_path.name} has {n} rows but {y_path.name} has {len(labels)} labels"
                )
            for row in self._rows(labels, part):
                path = f"{x_path.name}[{row}]"
                sources.append(Source(path, int(labels[row]), part, path))
        return self.make_index(sorted(sources, key=lambda s: s.path), expected_counts=self._expected())

    def _shipped(self, raw: Path, part: str, kind: str) -> Path:
        """The .h5 file if present (no decompression needed), else the shipped .h5.gz."""
        name = file_name(part, kind)
        for path in (raw / name, raw / f"{name}.gz"):
            if path.is_file():
                return path
        raise verify_download(self.name, raw / f"{name}.gz", f"missing {name} or {name}.gz")

    def _check_x(self, local: Path, shipped: Path) -> int:
        with self._open(local, shipped) as f:
            x = self._dataset(f, "x", shipped)
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != PATCH_SHAPE:
                raise verify_download(
                    self.name, shipped, f"key 'x' is {x.dtype} {x.shape}, expected uint8 (N, 96, 96, 3)"
                )
            return x.shape[0]

    def _read_y(self, local: Path, shipped: Path) -> np.ndarray:
        with self._open(local, shipped) as f:
            y = self._dataset(f, "y", shipped)
            if y.dtype.kind not in "biu" or y.ndim < 1 or any(d != 1 for d in y.shape[1:]):
                raise verify_download(
                    self.name, shipped, f"key 'y' is {y.dtype} {y.shape}, expected integers (N, 1, 1, 1)"
                )
            labels = y[...].reshape(y.shape[0]).astype(np.int64)
        bad = np.flatnonzero((labels != 0) & (labels != 1))
        if bad.size:
            i = int(bad[0])
            raise verify_download(
                self.name, shipped, f"label {labels[i]} at row {i} ({bad.size} rows outside {{0, 1}})"
            )
        return labels

    def _open(self, local: Path, shipped: Path) -> h5py.File:
        try:
            return h5py.File(local, "r")
        except OSError as exc:
            raise verify_download(self.name, shipped, f"not a readable HDF5 file ({exc})") from None

    def _dataset(self, f: h5py.File, key: str, shipped: Path) -> h5py.Dataset:
        if not isinstance(f.get(key), h5py.Dataset):
            raise verify_download(self.name, shipped, f"missing HDF5 key {key!r} (keys: {sorted(f.keys())})")
        return f[key]

    def _rows(self, labels: np.ndarray, part: str) -> list[int]:
        """Every row, or HistoKT's balanced archive: the first k per class after a seed-42 shuffle."""
        k = self.option_values["per_class"]
        if not k or part == "test":
            return list(range(len(labels)))
        k = k if part == "train" else round(k / 5)
        order = list(range(len(labels)))
        random.Random(42).shuffle(order)
        taken, out = [0, 0], []
        for row in order:
            c = int(labels[row])
            if taken[c] < k:
                taken[c] += 1
                out.append(row)
        return sorted(out)

    # -- gzip cache ---------------------------------------------------------------------------------------
    def cache_dir(self) -> Path:
        if self.option_values["cache"]:
            return Path(self.option_values["cache"]).expanduser()
        root = os.environ.get("HISTOKT_CACHE")
        return (Path(root).expanduser() if root else Path.home() / ".cache" / "histokt") / "pcam"

    def local_file(self, shipped: Path) -> Path:
        """A path h5py can open: ``shipped`` itself, or its decompressed copy in the cache."""
        if shipped.suffix != ".gz":
            with open(shipped, "rb") as f:
                if f.read(2) == b"\x1f\x8b":
                    raise verify_download(self.name, shipped, "is gzip-compressed; name it .h5.gz (or gunzip it)")
            return shipped
        return gunzip_cached(shipped, self.cache_dir(), self.name)

    # -- read ---------------------------------------------------------------------------------------------
    def read(self, raw: Path, source: Source) -> np.ndarray:
        m = ROW_PATH.fullmatch(source.path)
        if not m:
            raise BadImage(f"not a PCam row path {source.path!r}, expected <file>[<row>]")
        x = self._x_dataset(raw, m["file"])
        try:
            return np.ascontiguousarray(x[int(m["row"])], dtype=np.uint8)
        except (OSError, IndexError, ValueError) as exc:
            raise BadImage(f"unreadable HDF5 row ({exc})") from None

    def _x_dataset(self, raw: Path, name: str) -> h5py.Dataset:
        """The open 'x' dataset of ``name``, opened lazily once per process (a forked child reopens)."""
        if os.getpid() != self._pid:
            self._handles, self._pid = {}, os.getpid()
        if name not in self._handles:
            shipped = raw / name
            self._handles[name] = self._open(self.local_file(shipped), shipped)["x"]
        return self._handles[name]


def gunzip_cached(gz: Path, cache: Path, dataset: str = "pcam") -> Path:
    """Decompress ``gz`` into ``cache`` once; reuse it while the .gz size/mtime record matches."""
    out = cache / gz.name[: -len(".gz")]
    record = cache / f"{out.name}.source.json"
    st = gz.stat()
    want = {"gz_name": gz.name, "gz_size": st.st_size, "gz_mtime_ns": st.st_mtime_ns}
    rec = read_json(record)
    if rec and {k: rec.get(k) for k in want} == want and out.is_file() and out.stat().st_size == rec.get("size"):
        return out
    try:
        cache.mkdir(parents=True, exist_ok=True)
        record.unlink(missing_ok=True)  # never leave a record that vouches for a file being replaced
        # Temp name + atomic rename: a concurrent reader or a crash never sees a half-written file.
        with atomic_path(out) as tmp, gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise verify_download(dataset, gz, f"corrupt or truncated gzip file ({exc})") from None
    except OSError as exc:
        raise UserError(
            f"{dataset}: cannot decompress {gz} into {cache} ({exc}); free space or set option cache=<folder>"
        ) from None
    write_json(record, {**want, "size": out.stat().st_size})
    return out


CARD = PCam
