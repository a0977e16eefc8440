"""`histokt store upgrade OLD NEW`: convert the datasets of a format-1 store (``histokt-patches/1``: one
uncompressed chunk file per patch, stored mirror-padded to the patch size) into format 2 (``schema``:
sharded, checksummed content, padded on read) in another store, without the raw data.

Exact: read through ``PatchReader``, every upgraded patch is byte for byte the format-1 patch. The content
size is the smallest (H, W), common to every patch of every split of the dataset, at which each patch
equals ``pad_on_read(patch[:H, :W], P)``; where no smaller size holds (tissue tiled at the patch size) it
is [P, P] and patches are stored whole. A first pass finds it: along each axis, the sizes n < P are kept
at which every patch so far has positions n … P-1 mirroring (numpy ``reflect``, no edge repeat) its
positions 0 … n-1 (one row against row n - 2 rejects most n at once), and the smallest kept is taken. The
sizes at which one patch mirrors are not an interval (93 px content mirrors at 93, and again at 185), so
this is the intersection over all patches, not the largest of each patch's smallest size. Rows and
columns are independent (``pad_on_read`` pads columns, then whole rows), so the two sizes together
reproduce each patch. The pass stops once no size below P is left on both axes, so a dataset of whole
patches is read in full only once, by the second pass. That pass writes the content and compares each
patch with its content padded before writing it; should one ever differ, the dataset is written again at
[P, P]. PCam (96 px at 0.972 µm/px: 93 px, padded to 272) upgrades to [93, 93], 8.6x smaller.

Safe to kill and to run again: each dataset is built in a hidden folder of NEW
(``.upgrade-<name>-<host>-<pid>``, which ``list_datasets`` and readers ignore) and appears by one
``os.rename``; a dataset already in NEW with the same fingerprint is skipped, so a rerun resumes, and the
folders of runs that died on this host are removed. Labels, source ids, boxes, sources and the split
groups are copied byte for byte; the attrs are the old ones with ``format`` histokt-patches/2 and
``content_size`` and ``shard_size`` added after ``patch_size`` (the fingerprint and histokt_version kept).
A format-2 dataset of OLD is copied as it is. A missing or truncated format-1 chunk file is a one-line
UserError naming it, and nothing of that dataset is published. Memory is flat: one shard of content.
"""

import contextlib
import json
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from histokt import lease
from histokt.atomic import fsync_dir, write_bytes
from histokt.errors import UserError, on_full_disk
from histokt.store.schema import FORMAT, FORMAT_1, SPLITS, check_format, dataset_attrs, list_datasets
from histokt.store.shards import SHARD_SIZE, pad_on_read, shard_count, shard_path, write_array_metadata, write_shard

META_ARRAYS = ("labels", "source_id", "box")
_PREFIX = ".upgrade-"


@dataclass
class Upgraded:
    """One dataset of OLD and what became of it in NEW."""

    name: str
    status: str  # "upgraded", "skipped" (already in NEW), "copied" (already format 2 in OLD)
    counts: dict
    patch_size: int
    content_size: list[int]


class _NotExact(Exception):
    """A patch differs from its content padded on read (the content size does not hold for it)."""


def upgrade(old, new, *, progress: bool = True, shard_size: int = SHARD_SIZE) -> list[Upgraded]:
    """Convert every format-1 dataset of store ``old`` into format 2 in store ``new`` (created, or an
    existing format-2 store); see the module docstring. Returns one ``Upgraded`` per dataset of ``old``."""
    old, new = Path(old), Path(new)
    names = _check_stores(old, new)
    plan = []
    for name in names:  # every refusal comes before any work
        try:
            attrs = dataset_attrs(old, name) or {}
        except ValueError as exc:
            raise UserError(f"{old / name / 'zarr.json'}: does not load ({exc}); the store OLD is damaged") from None
        if attrs.get("format") not in (FORMAT, FORMAT_1):
            check_format(old, name, attrs)
        plan.append((name, attrs, _already_there(old, new, name, attrs)))
    created = not new.exists()
    published = False
    done = []
    try:
        with on_full_disk(new):
            new.mkdir(parents=True, exist_ok=True)
            _clean_leftovers(new)
            for name, attrs, there in plan:
                if there is not None:
                    done.append(there)
                    continue
                if not (new / "zarr.json").is_file():
                    write_bytes(new / "zarr.json", (old / "zarr.json").read_bytes())
                done.append(_publish(old, new, name, attrs, progress, shard_size))
                published = True
    except BaseException:
        if created and not published:  # nothing of ours stays behind (never more than ours: no rmtree)
            with contextlib.suppress(OSError):
                if [p.name for p in new.iterdir()] == ["zarr.json"]:
                    (new / "zarr.json").unlink()
                new.rmdir()
        raise
    return done


def _check_stores(old: Path, new: Path) -> list[str]:
    """The datasets of OLD, or a UserError for stores that cannot be upgraded one into the other."""
    if not old.is_dir():
        raise UserError(f"{old}: no such store")
    if not (old / "zarr.json").is_file():
        raise UserError(f"{old}: not a histokt store (no zarr.json)")
    a, b = old.resolve(), new.resolve()
    if a == b:
        raise UserError(f"{new}: NEW is the store OLD itself; upgrade into another, new or format-2, store")
    if a in b.parents:
        raise UserError(f"{new}: NEW lies inside the store OLD ({old}); choose a folder outside it")
    if b in a.parents:
        raise UserError(f"{new}: NEW holds the store OLD ({old}); choose another folder")
    if new.exists():
        if not new.is_dir():
            raise UserError(f"{new}: exists and is not a folder; choose a new or a format-2 store")
        foreign = [p.name for p in new.iterdir() if not p.name.startswith((_PREFIX, ".zarr.json."))]
        if foreign and not (new / "zarr.json").is_file():
            raise UserError(f"{new}: exists but is not a zarr store; choose a new or a format-2 store")
    names = list_datasets(old)
    if not names:
        raise UserError(f"{old}: holds no dataset to upgrade")
    return names


def _already_there(old: Path, new: Path, name: str, attrs: dict) -> Upgraded | None:
    """The dataset as it already is in NEW when it is this dataset's upgrade (same fingerprint), None when
    NEW does not hold it; a UserError when NEW holds something else under that name."""
    target = new / name
    if not target.exists():
        return None
    try:
        have = dataset_attrs(new, name)
    except ValueError:
        have = None
    if have is None:
        raise UserError(f"{target}: exists and is not a dataset; move it away, or upgrade into another store")
    fingerprint = attrs.get("fingerprint")
    if have.get("format") != FORMAT or fingerprint is None or have.get("fingerprint") != fingerprint:
        raise UserError(
            f"{target}: holds another dataset {name!r} (format {have.get('format')!r}, fingerprint "
            f"{have.get('fingerprint')}; {old / name} has {fingerprint}); move it away, or upgrade into another store"
        )
    return Upgraded(name, "skipped", dict(have.get("counts", {})), int(have["patch_size"]), list(have["content_size"]))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    # a folder of our own pid is from an earlier life of this pid (a container restarted)
    return pid != os.getpid() and lease.alive(pid)


def _clean_leftovers(new: Path) -> None:
    """Remove the work folders of upgrades that died on this host (those of other hosts may be live)."""
    mine = re.compile(rf"{re.escape(_PREFIX)}.+-{re.escape(_host())}-(\d+)")
    for entry in new.iterdir():
        m = mine.fullmatch(entry.name)
        if m and entry.is_dir() and not _alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _publish(old: Path, new: Path, name: str, attrs: dict, progress: bool, shard_size: int) -> Upgraded:
    """Build dataset ``name`` in a hidden work folder of NEW and rename it into place."""
    work = new / f"{_PREFIX}{name}-{_host()}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        src = old / name
        if attrs.get("format") == FORMAT:
            shutil.copytree(src, work, copy_function=shutil.copyfile)
            done = Upgraded(name, "copied", dict(attrs["counts"]), int(attrs["patch_size"]), attrs["content_size"])
        else:
            done = _convert(src, work, name, attrs, progress, shard_size)
        _fsync_tree(work)
        try:
            os.rename(work, new / name)
        except OSError:  # another run published it meanwhile: fine if it is the same dataset
            there = _already_there(old, new, name, attrs)
            if there is None:
                raise
            shutil.rmtree(work, ignore_errors=True)
            return there
        fsync_dir(new)
        return done
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _convert(src: Path, work: Path, name: str, attrs: dict, progress: bool, shard_size: int) -> Upgraded:
    """Write the format-2 form of the format-1 dataset ``src`` into ``work``."""
    splits = [s for s in SPLITS if (src / s / "zarr.json").is_file()]
    if not splits:
        raise UserError(f"{src}: holds no split (train, valid, test); the format-1 store is damaged: {_redo}")
    arrays = {s: _v1_images(src / s / "images") for s in splits}
    p = int(attrs.get("patch_size") or arrays[splits[0]][1])
    for s, (n, size) in arrays.items():
        counted = attrs.get("counts", {}).get(s)
        if size != p or counted != n:
            raise UserError(
                f"{src / s / 'images'}: {n} patches of {size} px, the dataset's attrs say {counted} of {p} px; "
                f"the format-1 store is inconsistent: standardize {name} again"
            )
    total = sum(n for n, _ in arrays.values())
    bar = tqdm(
        total=2 * total, desc=f"upgrade {name}", unit="patch", disable=None if progress else True, file=sys.stderr
    )
    with bar:
        h, w = content_size(
            (_read_v1(src / s / "images", i, p) for s in splits for i in range(arrays[s][0])), p, bar.update
        )
        bar.n = total  # the first pass stops early where the content is the whole patch
        for hw in dict.fromkeys([(h, w), (p, p)]):  # the found size; the whole patch should a patch differ
            try:
                for s in splits:
                    _write_images(src / s / "images", work / s / "images", arrays[s][0], p, hw, shard_size, bar)
            except _NotExact:
                for s in splits:
                    shutil.rmtree(work / s / "images", ignore_errors=True)
                bar.n = total
                continue
            h, w = hw
            break
    for s in splits:
        for array in META_ARRAYS:
            _check_rows(src / s / array, arrays[s][0])
            shutil.copytree(src / s / array, work / s / array, copy_function=shutil.copyfile)
        shutil.copyfile(src / s / "zarr.json", work / s / "zarr.json")
    shutil.copytree(src / "sources", work / "sources", copy_function=shutil.copyfile)
    meta = json.loads((src / "zarr.json").read_text())
    meta["attributes"] = format2_attrs(attrs, [h, w], shard_size)
    write_bytes(work / "zarr.json", json.dumps(meta, indent=2).encode())
    counts = {s: arrays[s][0] for s in splits}
    return Upgraded(name, "upgraded", counts, p, [h, w])


def format2_attrs(attrs: dict, content: list[int], shard_size: int) -> dict:
    """The old attrs in their order, ``format`` histokt-patches/2, content_size and shard_size after
    patch_size (at the end where there is none)."""
    out = {}
    for key, value in attrs.items():
        out[key] = FORMAT if key == "format" else value
        if key == "patch_size":
            out["content_size"], out["shard_size"] = content, shard_size
    out.setdefault("content_size", content)
    out.setdefault("shard_size", shard_size)
    out["format"] = FORMAT
    return out


def _v1_images(array_dir: Path) -> tuple[int, int]:
    """(N, P) of a format-1 images array, or a UserError where its zarr.json is not that layout."""
    meta_path = array_dir / "zarr.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise UserError(f"{meta_path}: is missing; the format-1 store is damaged") from None
    except ValueError:
        raise UserError(f"{meta_path}: is not JSON; the format-1 store is damaged") from None
    shape = meta.get("shape")
    grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
    enc = meta.get("chunk_key_encoding", {})
    if not (
        isinstance(shape, list)
        and len(shape) == 4
        and shape[1] == shape[2]
        and shape[3] == 3
        and meta.get("data_type") == "uint8"
        and grid == [1, *shape[1:]]
        and [c.get("name") for c in meta.get("codecs", [])] == ["bytes"]
        and enc.get("name") == "default"
        and enc.get("configuration", {}).get("separator", "/") == "/"
    ):
        raise UserError(
            f"{meta_path}: not the format-1 layout (one uncompressed chunk of [1, P, P, 3] uint8 per patch); "
            f"this array was rewritten by another tool: standardize the dataset again"
        )
    return int(shape[0]), int(shape[1])


def _read_v1(array_dir: Path, index: int, p: int) -> np.ndarray:
    """Format-1 patch ``index``: its chunk file's raw bytes, or a UserError naming the file."""
    path = f"{array_dir}/c/{index}/0/0/0"
    nbytes = p * p * 3
    try:
        with open(path, "rb") as f:
            data = f.read(nbytes + 1)
    except FileNotFoundError:
        raise UserError(f"{path}: is missing (patch {index}); the format-1 store is damaged: {_redo}") from None
    if len(data) != nbytes:
        raise UserError(
            f"{path}: has {len(data)} bytes, a {p} px patch has {nbytes} (patch {index}); the format-1 store "
            f"is damaged: {_redo}"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(p, p, 3)


_redo = "standardize this dataset again from its raw data (nothing of it was published)"


def _write_images(src: Path, dst: Path, n: int, p: int, hw: tuple[int, int], shard_size: int, bar) -> None:
    """The sharded content array of the format-1 images ``src`` at content size ``hw``, one shard of
    content in memory at a time; _NotExact where a patch is not its content padded."""
    h, w = hw
    write_array_metadata(dst, n, h, w, shard_size)
    buf = np.empty((min(n, shard_size), h, w, 3), dtype=np.uint8)
    for s in range(shard_count(n, shard_size)):
        first = s * shard_size
        k = min(shard_size, n - first)
        for j in range(k):
            patch = _read_v1(src, first + j, p)
            buf[j] = patch[:h, :w]
            if (h, w) != (p, p) and not np.array_equal(pad_on_read(buf[j], p), patch):
                raise _NotExact(f"{src}: patch {first + j}")
        write_shard(shard_path(dst, s), buf[:k], shard_size=shard_size)
        bar.update(k)


def _check_rows(path: Path, n: int) -> None:
    try:
        shape = json.loads((path / "zarr.json").read_text())["shape"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{path}: is missing or not a zarr array; the format-1 store is damaged: {_redo}") from None
    if not shape or shape[0] != n:
        raise UserError(f"{path}: shape {shape}, expected {n} rows; the format-1 store is damaged: {_redo}")


def content_size(patches, p: int, done=None) -> tuple[int, int]:
    """The smallest (H, W) at which every (p, p, 3) patch of ``patches`` (an iterable, read once) is
    ``pad_on_read(patch[:H, :W], p)``; (p, p) where no smaller size holds, found as soon as it is certain
    (the rest of ``patches`` then is not read). ``done(1)`` is called per patch read."""
    rows, cols = _MirrorSizes(p), _MirrorSizes(p)
    pixel = np.dtype((np.void, 3))
    for patch in patches:
        rows.add(patch)
        # columns as rows: a transposed copy, made by whole pixels (~3x faster than by bytes)
        cols.add(np.ascontiguousarray(patch.view(pixel).reshape(p, p).T).view(np.uint8).reshape(p, p, 3))
        if done is not None:
            done(1)
        if not rows.sizes and not cols.sizes:  # (p, p) whatever follows: tissue tiled at the patch size
            break
    return rows.smallest(), cols.smallest()


class _MirrorSizes:
    """The sizes n < p along the first axis at which every array seen so far is its positions 0 … n-1
    followed by their reflection (numpy ``reflect``: period 2(n-1), the edge not repeated)."""

    def __init__(self, p: int):
        self.p = p
        self.sizes = list(range(1, p))

    def smallest(self) -> int:
        return self.sizes[0] if self.sizes else self.p

    def add(self, a: np.ndarray) -> None:
        self.sizes = [n for n in self.sizes if _mirrors(a, n)]


def _mirrors(a: np.ndarray, n: int) -> bool:
    """Whether positions n … end of ``a`` (first axis) reflect positions 0 … n-1 without repeating the edge.

    Position k < period 2(n-1) reflects 2(n-1) - k, and every later position repeats the one a period
    before it; views only, no copy. The first comparison (position n against n - 2) rejects most n."""
    p = len(a)
    if n == 1:
        return bool((a[1:] == a[0]).all())
    period = 2 * (n - 1)
    end = min(p, period)
    return (
        np.array_equal(a[n], a[n - 2])
        and np.array_equal(a[n:end], a[n - 2 : period - end : -1])
        and (p <= period or np.array_equal(a[period:], a[: p - period]))
    )


def _fsync_tree(root: Path) -> None:
    """Make every file and folder under ``root`` durable before it is renamed into view."""
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(folder)
