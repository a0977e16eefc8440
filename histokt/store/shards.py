"""Sharded patch arrays (the foundation of store format histokt-patches/2): many patches per file, each
patch followed by its CRC32C, read one patch per ``pread``.

The bytes are exactly zarr v3's ``sharding_indexed`` codec, so zarr itself reads these arrays. An images
array of shape (N, H, W, 3) uint8 has shards (S, H, W, 3) (S patches per file, ``SHARD_SIZE`` by default)
and inner chunks (1, H, W, 3); shard ``s`` holds patches s·S … s·S + S - 1 in the file ``c.<s>.0.0.0`` (zarr's
default chunk keys with the "." separator: the shard files lie flat in the array's folder, one inode each,
no folder per shard)::

    chunk 0: H·W·3 patch bytes (C order), CRC32C of them (4 bytes, little-endian)    inner codecs
    chunk 1: …                                                                       [bytes, crc32c]
    index:   S × (offset uint64, nbytes uint64), little-endian; an absent chunk is   index codecs
             (2^64-1, 2^64-1); then the CRC32C of the index (4 bytes)                [bytes, crc32c], at the end

Only the last shard may hold fewer than S patches; its index still has S entries, the missing ones absent
(as zarr writes it). One shard is written whole by one writer (``write_shard``, atomically): never a
read-modify-write. Patches are stored as content, without padding; ``pad_on_read`` mirror-pads a patch
smaller than the patch size exactly as ingest does before tiling.

Unlike zarr, which returns the fill value for an absent chunk and does not name what it failed on, the
reader raises ``ShardDamaged`` (one line: the shard file, the patch index, what is wrong) for a missing or
truncated file, a damaged index, an absent patch or a patch whose checksum does not match, never zeros.
"""

import contextlib
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from histokt.atomic import atomic_path, write_json
from histokt.errors import UserError

SHARD_SIZE = 512  # patches per shard file: ~113 MB of 272 px patches, ~13 MB of 93 px ones
ABSENT = 2**64 - 1  # the index entry (offset, nbytes) of a chunk a shard does not hold
# CRC32C over any message followed by its own little-endian CRC32C: one pass checks patch and checksum.
_RESIDUE = 0x48674BC7
_CRC = 4
_ENTRY = 16  # offset uint64, nbytes uint64

_BYTES_LE = {"name": "bytes", "configuration": {"endian": "little"}}
_CRC32C = {"name": "crc32c"}


def array_metadata(n: int, h: int, w: int, shard_size: int = SHARD_SIZE) -> dict:
    """The zarr.json of an images array of ``n`` patches of (h, w, 3) uint8 content, ``shard_size`` per
    shard file: the metadata zarr.create_array writes for it (dimension names n, y, x, c; fill 0)."""
    if min(h, w, shard_size) < 1 or n < 0:
        raise ValueError(f"bad sharded array: {n} patches of {h}x{w}, {shard_size} per shard")
    return {
        "shape": [n, h, w, 3],
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_size, h, w, 3]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": 0,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [1, h, w, 3],
                    "codecs": [{"name": "bytes"}, {"name": "crc32c"}],
                    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                    "index_location": "end",
                },
            }
        ],
        "attributes": {},
        "dimension_names": ["n", "y", "x", "c"],
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def write_array_metadata(array_dir, n: int, h: int, w: int, shard_size: int = SHARD_SIZE) -> None:
    """Write ``array_metadata`` as ``array_dir``/zarr.json, atomically."""
    write_json(Path(array_dir) / "zarr.json", array_metadata(n, h, w, shard_size))


def shard_count(n: int, shard_size: int = SHARD_SIZE) -> int:
    return -(-n // shard_size)


def shard_path(array_dir, shard: int) -> Path:
    """Where zarr's default chunk-key encoding (separator ".") puts shard ``shard`` of a 4-D array."""
    return Path(array_dir) / f"c.{shard}.0.0.0"


def _index_nbytes(shard_size: int) -> int:
    return shard_size * _ENTRY + _CRC


def shard_nbytes(count: int, h: int, w: int, shard_size: int = SHARD_SIZE) -> int:
    """The size of a sound shard file of ``count`` patches of (h, w, 3) content: each patch and its CRC32C,
    then the index of ``shard_size`` entries and its CRC32C."""
    return count * (h * w * 3 + _CRC) + _index_nbytes(shard_size)


@dataclass(frozen=True)
class ShardInfo:
    """One written shard file: its path, patch count, size in bytes and sha256 (hex), for a later check."""

    path: str
    count: int
    nbytes: int
    sha256: str


def write_shard(path, patches: Iterable[np.ndarray], *, shard_size: int = SHARD_SIZE) -> ShardInfo:
    """Write one whole shard file of ``shard_size`` slots from ``patches`` (an array (k, H, W, 3) uint8, or
    any iterable of (H, W, 3) uint8 arrays, consumed one at a time: memory stays at one patch), patch j in
    slot j (slots k … shard_size - 1 absent: only an array's last shard is partial).

    Atomic: the bytes go to a temporary file beside ``path``, are fsynced and renamed over it, so ``path``
    is either absent, or the old file, or this whole shard."""
    digest = hashlib.sha256()
    k = size = chunk = 0
    shape = None
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for patch in patches:
            patch = np.asarray(patch)
            if patch.dtype != np.uint8 or patch.ndim != 3 or patch.shape[2] != 3 or shape not in (None, patch.shape):
                want = "(H, W, 3) uint8" if shape is None else f"{shape} uint8 like the first"
                raise ValueError(f"a shard holds {want} patches, not {patch.dtype} {patch.shape}")
            if k == shard_size:
                raise ValueError(f"a shard holds 1 to {shard_size} patches, not {k + 1} or more")
            shape, chunk = patch.shape, patch.nbytes + _CRC
            data = patch.tobytes()
            for part in (data, google_crc32c.value(data).to_bytes(_CRC, "little")):
                f.write(part)
                digest.update(part)
            size += chunk
            k += 1
        if k == 0:
            raise ValueError(f"a shard holds 1 to {shard_size} patches, not 0")
        index = np.full((shard_size, 2), ABSENT, dtype="<u8")
        index[:k, 0] = np.arange(k, dtype=np.uint64) * chunk
        index[:k, 1] = chunk
        raw = index.tobytes()
        tail = raw + google_crc32c.value(raw).to_bytes(_CRC, "little")
        f.write(tail)
        digest.update(tail)
        size += len(tail)
    return ShardInfo(str(path), k, size, digest.hexdigest())


def _shard_number(path: Path) -> int | None:
    """s for a shard file at .../c.<s>.0.0.0, else None."""
    parts = Path(path).name.split(".")
    if len(parts) == 5 and parts[0] == "c" and parts[1].isdigit() and parts[2:] == ["0", "0", "0"]:
        return int(parts[1])
    return None


def verify_shard(
    path, expected_count: int, *, shard_size: int = SHARD_SIZE, patch_nbytes: int | None = None
) -> list[str]:
    """Every problem of one shard file, one line each naming the file and the patch (empty: sound).

    Reads the file once, a patch at a time (one ``pread`` each: flat memory, and no fresh 100 MB buffer to
    fault in per shard). ``expected_count`` patches must be present, in slots 0 … expected_count - 1,
    and no others; each with ``patch_nbytes`` bytes (H·W·3) where given, else all of one size."""
    path = Path(path)
    shard = _shard_number(path)

    def where(j: int) -> str:
        return f"{path}: patch {shard * shard_size + j}" if shard is not None else f"{path}: chunk {j}"

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return [f"{path}: is missing ({expected_count} patches expected)"]
    try:
        size = os.fstat(fd).st_size
        index_nbytes = _index_nbytes(shard_size)
        if size < index_nbytes:
            return [f"{path}: is truncated ({size} bytes, shorter than its {index_nbytes}-byte index)"]
        data_end = size - index_nbytes
        tail = os.pread(fd, index_nbytes, data_end)
        if google_crc32c.value(tail) != _RESIDUE:
            return [f"{path}: index checksum mismatch ({size} bytes; truncated or damaged)"]
        index = np.frombuffer(tail, dtype="<u8", count=shard_size * 2).reshape(shard_size, 2).tolist()
        problems = []
        sizes = set()
        for j, (offset, nbytes) in enumerate(index):
            if offset == ABSENT and nbytes == ABSENT:
                if j < expected_count:
                    problems.append(f"{where(j)}: is absent from the shard index")
                continue
            if j >= expected_count:
                problems.append(f"{where(j)}: is present, but the shard should hold only {expected_count} patches")
            expected = None if patch_nbytes is None else patch_nbytes + _CRC
            if nbytes < _CRC or (expected is not None and nbytes != expected):
                problems.append(f"{where(j)}: has {nbytes} bytes in the index, expected {expected or 'at least 4'}")
                continue
            if offset + nbytes > data_end:
                problems.append(f"{where(j)}: lies past the end of the data ({offset} + {nbytes} > {data_end} bytes)")
                continue
            sizes.add(nbytes)
            chunk = os.pread(fd, nbytes, offset)
            if len(chunk) != nbytes:
                problems.append(f"{where(j)}: short read ({len(chunk)} of {nbytes} bytes)")
            elif google_crc32c.value(chunk) != _RESIDUE:
                stored = int.from_bytes(chunk[-_CRC:], "little")
                problems.append(
                    f"{where(j)}: patch checksum mismatch (stored {stored:#010x}, "
                    f"computed {google_crc32c.value(chunk[:-_CRC]):#010x})"
                )
    finally:
        os.close(fd)
    if len(sizes) > 1:
        problems.append(f"{path}: patches of different sizes {sorted(s - _CRC for s in sizes)} in one shard")
    return problems


class StoreDamaged(UserError):
    """A finished dataset's patch data is missing, truncated or fails a checksum. Every kept patch is
    written before a dataset appears, so this is always damage (a purged, truncated or corrupted file),
    never an unwritten patch."""

    def __init__(self, message: str):
        # raised in a DataLoader worker, it is raised again in the main process with the worker's whole
        # traceback as its message: the user is told its last line, the one-line message, alone
        if "Traceback (most recent call last)" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


class ShardDamaged(StoreDamaged):
    """A shard file of a finished array is missing, truncated or fails a checksum: the store is damaged.

    ``path`` (the shard file), ``index`` (the patch asked for) and ``problem`` are kept for callers that
    phrase their own advice."""

    def __init__(self, path, index: int, problem: str):
        self.path, self.index, self.problem = str(path), index, problem
        super().__init__(f"{path}: patch {index}: {problem}; the store is damaged")


class ShardLayoutError(UserError):
    """An images array whose zarr.json is not the sharded layout ``array_metadata`` describes."""


def _layout(meta: dict, where: Path) -> tuple[tuple[int, int, int, int], int]:
    """(shape, shard size) of a sharded images array's metadata, or ShardLayoutError naming what differs."""

    def bad(what: str) -> ShardLayoutError:
        return ShardLayoutError(f"{where}: not a sharded patch array ({what})")

    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and shape[3] == 3):
        raise bad(f"shape {shape}, expected [N, H, W, 3]")
    if meta.get("data_type") != "uint8":
        raise bad(f"data type {meta.get('data_type')}, expected uint8")
    grid = meta.get("chunk_grid", {})
    shard = grid.get("configuration", {}).get("chunk_shape")
    if grid.get("name") != "regular" or not (isinstance(shard, list) and shard[1:] == shape[1:] and shard[0] >= 1):
        raise bad(f"shard shape {shard}, expected [S, {shape[1]}, {shape[2]}, 3]")
    enc = meta.get("chunk_key_encoding", {})
    if enc.get("name") != "default" or enc.get("configuration", {}).get("separator", "/") != ".":
        raise bad(f"chunk key encoding {enc}, expected default with '.'")
    codecs = meta.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        raise bad(f"codecs {[c.get('name') for c in codecs]}, expected [sharding_indexed]")
    conf = codecs[0].get("configuration", {})
    if conf.get("chunk_shape") != [1, *shape[1:]]:
        raise bad(f"inner chunks {conf.get('chunk_shape')}, expected [1, {shape[1]}, {shape[2]}, 3]")
    inner = conf.get("codecs", [])
    if [c.get("name") for c in inner] != ["bytes", "crc32c"]:
        raise bad(f"inner codecs {[c.get('name') for c in inner]}, expected [bytes, crc32c]")
    if conf.get("index_codecs") != [_BYTES_LE, _CRC32C] or conf.get("index_location", "end") != "end":
        raise bad("index codecs or location differ from [bytes (little), crc32c] at the end")
    return (shape[0], shape[1], shape[2], 3), shard[0]


class ShardedReader:
    """Random access to the patches of one sharded images array: one ``pread`` and one CRC32C per patch.

    zarr.json is read once, on first use. Shard files open lazily; the last ``max_open`` stay open (an LRU
    of file descriptors) and each shard's index is read, checked and kept on its first use (16 bytes per
    patch). Pickles to its path alone (no descriptors), so it is safe to send to DataLoader workers. Not
    thread-safe: one reader per thread. ``read`` returns read-only arrays.
    """

    def __init__(self, array_dir, *, max_open: int = 8):
        self.path = Path(array_dir)
        self.max_open = max(1, max_open)
        self._reset()

    def _reset(self) -> None:
        self._shape: tuple[int, int, int, int] | None = None
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._index: dict[int, tuple[list, int]] = {}  # shard -> ([[offset, nbytes], ...], where data ends)

    def __getstate__(self):
        return {"path": self.path, "max_open": self.max_open}

    def __setstate__(self, state):
        self.path, self.max_open = state["path"], state["max_open"]
        self._reset()

    def _open(self) -> tuple[int, int, int, int]:
        meta_path = self.path / "zarr.json"
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise ShardLayoutError(f"{meta_path}: is missing; not a zarr array") from None
        shape, self.shard_size = _layout(meta, meta_path)
        self._patch_nbytes = shape[1] * shape[2] * 3
        self._chunk_nbytes = self._patch_nbytes + _CRC
        self._index_nbytes = _index_nbytes(self.shard_size)
        self._shape = shape
        return shape

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, H, W, 3): the patch count and the stored content's shape."""
        return self._shape or self._open()

    def __len__(self) -> int:
        return self.shape[0]

    def shard_path(self, shard: int) -> Path:
        return shard_path(self.path, shard)

    def shard_nbytes(self, shard: int) -> int:
        """The size shard file ``shard`` has when it is sound."""
        _, h, w, _ = self.shape
        return shard_nbytes(self.expected_count(shard), h, w, self.shard_size)

    def expected_count(self, shard: int) -> int:
        """How many patches shard ``shard`` holds (S, or fewer in the last shard)."""
        n = self.shape[0]
        return max(0, min(self.shard_size, n - shard * self.shard_size))

    def _fd(self, shard: int, index: int) -> int:
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        path = self.shard_path(shard)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ShardDamaged(path, index, "the shard file is missing") from None
        self._fds[shard] = fd
        while len(self._fds) > self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _shard_index(self, shard: int, index: int, fd: int) -> tuple[list, int]:
        path = self.shard_path(shard)
        size = os.fstat(fd).st_size
        expected = self.shard_nbytes(shard)
        if size < self._index_nbytes:
            raise ShardDamaged(path, index, f"the shard file is truncated ({size} of {expected} bytes; no index)")
        raw = os.pread(fd, self._index_nbytes, size - self._index_nbytes)
        if google_crc32c.value(raw) != _RESIDUE:
            if size < expected:
                raise ShardDamaged(
                    path, index, f"the shard file is truncated ({size} of {expected} bytes; its index is lost)"
                )
            raise ShardDamaged(path, index, "shard index checksum mismatch")
        entries = np.frombuffer(raw, dtype="<u8", count=self.shard_size * 2).reshape(-1, 2).tolist()
        self._index[shard] = entries, size - self._index_nbytes
        return self._index[shard]

    def read(self, index: int) -> np.ndarray:
        """The (H, W, 3) uint8 content of patch ``index`` (read-only), its checksum verified."""
        n, h, w, _ = self._shape or self._open()
        if not 0 <= index < n:
            raise IndexError(f"patch {index} out of range for {self.path} ({n} patches)")
        shard, j = divmod(index, self.shard_size)
        fd = self._fd(shard, index)
        entries, data_end = self._index.get(shard) or self._shard_index(shard, index, fd)
        offset, nbytes = entries[j]
        if nbytes != self._chunk_nbytes or offset + nbytes > data_end:
            raise ShardDamaged(self.shard_path(shard), index, self._bad_entry(offset, nbytes, data_end))
        data = os.pread(fd, nbytes, offset)
        if len(data) != nbytes:
            raise ShardDamaged(self.shard_path(shard), index, f"short read ({len(data)} of {nbytes} bytes)")
        if google_crc32c.value(data) != _RESIDUE:
            stored = int.from_bytes(data[-_CRC:], "little")
            computed = google_crc32c.value(data[:-_CRC])
            raise ShardDamaged(
                self.shard_path(shard),
                index,
                f"patch checksum mismatch (stored {stored:#010x}, computed {computed:#010x})",
            )
        return np.frombuffer(data, dtype=np.uint8, count=self._patch_nbytes).reshape(h, w, 3)

    def _bad_entry(self, offset: int, nbytes: int, data_end: int) -> str:
        if offset == ABSENT and nbytes == ABSENT:
            return "the patch is absent from the shard index"
        if nbytes != self._chunk_nbytes:
            return f"the shard index gives {nbytes} bytes, expected {self._chunk_nbytes}"
        return f"the shard index points past the data ({offset} + {nbytes} > {data_end} bytes)"

    def verify(self, shard: int) -> list[str]:
        """``verify_shard`` of shard ``shard`` with this array's layout."""
        count = self.expected_count(shard)  # opens the metadata first
        return verify_shard(self.shard_path(shard), count, shard_size=self.shard_size, patch_nbytes=self._patch_nbytes)

    def close(self) -> None:
        """Close the open shard files (the reader reopens them on its next read)."""
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):  # at interpreter exit os may already be gone
            self.close()


def pad_on_read(content: np.ndarray, patch_size: int) -> np.ndarray:
    """Mirror-pad stored content (h, w ≤ patch_size) at the bottom and right to (patch_size, patch_size),
    reflecting without repeating the edge pixel: pixel for pixel what ingest's ``mirror_pad`` (numpy
    ``reflect``) gives, several times faster (~25 µs instead of ~240 µs for 93 px content). Content that is
    already patch-sized is returned as is; 2-D content (a mask) works too."""
    h, w = content.shape[:2]
    if h > patch_size or w > patch_size:
        raise ValueError(f"content of {h}x{w} is larger than the {patch_size} px patch")
    if h == patch_size and w == patch_size:
        return content
    out = np.empty((patch_size, patch_size, *content.shape[2:]), dtype=content.dtype)
    out[:h, :w] = content
    # whole pixels as one void element each: a reversed copy of pixels then runs ~2x faster than per byte
    pixels = out.view(np.dtype((np.void, out[0, 0].nbytes))).reshape(patch_size, patch_size)
    _reflect_fill(pixels[:h], w, axis=1)
    _reflect_fill(pixels, h, axis=0)
    return out


def _reflect_fill(a: np.ndarray, n: int, axis: int) -> None:
    """Fill positions n … end of ``axis`` of ``a`` by reflecting positions 0 … n-1 (no edge repeat).

    Reflection has period p = 2(n-1): position k < p takes p - k, and k ≥ p takes k - p, so after the
    first reflection the filled part is copied forward in doubling blocks."""
    size = a.shape[axis]

    def at(start: int, stop: int | None, step: int | None = None) -> tuple:
        return (slice(None),) * axis + (slice(start, stop, step),)

    if n >= size:
        return
    if n == 1:
        a[at(1, size)] = a[at(0, 1)]
        return
    period = 2 * (n - 1)
    end = min(period, size)
    a[at(n, end)] = a[at(period - n, period - end, -1)]
    k = period
    while k < size:
        m = min(k, size - k)
        a[at(k, k + m)] = a[at(0, m)]
        k += m
