"""`histokt verify`: check every byte of a format-2 patch store against its checksums and its own metadata.

For each split of each dataset (or of one), the images array's zarr.json must load as the sharded layout
(``shards.array_metadata``) and hold attrs ``counts[split]`` patches of attrs ``content_size``, with the
attrs' shard size and no shard file beyond its count; labels, source_id and box must load with one row
per patch and decode (they carry no checksum, and zarr writes no chunk of zeros, so a deleted chunk of
theirs reads as zeros, unseen). Then every shard file is read whole, once, and checked at both CRC32C
levels, its index and each patch (``ShardedReader.verify``).

Memory stays flat: a worker reads one patch at a time (one ``pread`` each).
``workers`` > 1 checks shards on a pool of threads: file reads and google-crc32c release the GIL
(measured: two CRCs in two threads take the time of one), so threads overlap reads where the file system
makes them wait; on a local store in the page cache one worker is as fast (benchmarks/verify.py).

The damage is a list of ``Damage`` records: one per damaged shard, with its split and number (what
``histokt standardize --repair`` re-creates from the raw data), and, with ``shard`` None, metadata that
does not load or disagrees with the attrs, and stray shard files beyond an array's count.
"""

import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from tqdm import tqdm

from histokt.errors import UserError
from histokt.store.schema import SPLITS, check_format, dataset_attrs, images_dir, list_datasets, repair_hint
from histokt.store.shards import ShardedReader, shard_count

META_ARRAYS = ("labels", "source_id", "box")
_SHARD_FILE = re.compile(r"c\.(\d+)\.0\.0\.0")


@dataclass
class Damage:
    """What is wrong with one file of a dataset.

    ``shard`` is the number of a damaged shard of ``split`` (a repair re-creates that shard's patches), or
    None for a metadata problem (``split`` is None where the dataset's own zarr.json is the problem).
    ``problems`` are one line each, naming the file (and the patch, for a patch checksum)."""

    dataset: str
    split: str | None
    shard: int | None
    path: str
    problems: list[str]

    def lines(self) -> list[str]:
        """What `histokt verify` prints: for a shard, one line (dataset, split, shard, its first problem,
        which names the file, and how many more); for metadata, one line per problem."""
        where = " ".join(
            x for x in (self.dataset, self.split, None if self.shard is None else f"shard {self.shard}") if x
        )
        if self.shard is None:
            return [f"{where}: {problem}" for problem in self.problems]
        more = f" (and {len(self.problems) - 1} more problems in this file)" if len(self.problems) > 1 else ""
        return [f"{where}: {self.problems[0]}{more}"]


@dataclass
class VerifyReport:
    """What ``verify_store`` checked (counts, bytes read, seconds) and the damage it found."""

    store: str
    datasets: list[str]
    splits: int = 0
    shards: int = 0
    patches: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    damage: list[Damage] = field(default_factory=list)

    @property
    def sound(self) -> bool:
        return not self.damage

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def damaged_datasets(self) -> list[str]:
        return sorted({d.dataset for d in self.damage})

    def summary(self) -> str:
        state = "sound" if self.sound else f"DAMAGED ({len(self.damage)} damaged files)"
        return (
            f"{self.store}: {len(self.datasets)} datasets, {self.splits} splits, {self.shards:,} shards, "
            f"{self.patches:,} patches, {self.nbytes / 1e9:.2f} GB checked in {self.seconds:.1f} s "
            f"({self.mb_per_s:,.0f} MB/s): {state}"
        )

    def lines(self) -> list[str]:
        """What `histokt verify` prints: one line per damaged file, the summary, then what to run."""
        out = [line for d in self.damage for line in d.lines()]
        out.append(self.summary())
        out += [f"to repair {name}: {repair_hint(self.store, name)}" for name in self.damaged_datasets()]
        return out


@dataclass
class _Task:
    """One shard to read and check."""

    dataset: str
    split: str
    shard: int
    reader: ShardedReader
    nbytes: int  # the size a sound shard file has


def verify_store(store, dataset: str | None = None, workers: int = 1, progress: bool = True) -> VerifyReport:
    """Check every shard and the metadata of every split of every dataset of ``store`` (or of ``dataset``).

    Raises UserError (one line) for what is not a format-2 store: no store, no such dataset, a format-1
    dataset (with the upgrade command to run). Damage is never raised: it is listed in the report."""
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    start = time.perf_counter()
    store = Path(store)
    if not (store / "zarr.json").is_file():
        raise UserError(f"{store}: not a histokt store (no zarr.json; run 'histokt standardize' first)")
    names = list_datasets(store)
    if dataset is not None:
        if dataset not in names:
            raise UserError(f"{store}: no dataset {dataset!r} (datasets in this store: {', '.join(names) or 'none'})")
        names = [dataset]
    report = VerifyReport(str(store), names)
    tasks: list[_Task] = []
    for name in names:  # every format is checked before any shard is read
        try:
            attrs = dataset_attrs(store, name) or {}
        except ValueError as exc:
            report.damage.append(
                Damage(name, None, None, str(store / name / "zarr.json"), [_bad_json(store, name, exc)])
            )
            continue
        check_format(store, name, attrs)
        tasks += _plan_dataset(store, name, attrs, report)
    report.shards = len(tasks)
    bar = tqdm(
        total=sum(t.nbytes for t in tasks),
        desc=f"verify {store.name}",
        unit="B",
        unit_scale=True,
        unit_divisor=1000,  # MB, GB: the units of the summary
        disable=None if progress and tasks else True,  # None: a bar on a terminal, silence in logs
        file=sys.stderr,
    )
    with bar:
        if workers == 1 or len(tasks) <= 1:
            results = map(_check, tasks)
            report.damage += _collect(results, bar, report)
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
                report.damage += _collect(pool.map(_check, tasks), bar, report)
    order = {s: i for i, s in enumerate(SPLITS)}
    report.damage.sort(
        key=lambda d: (d.dataset, order.get(d.split or "", -1), -1 if d.shard is None else d.shard, d.path)
    )
    report.seconds = time.perf_counter() - start
    return report


def damaged_shards(store, dataset: str, workers: int = 1) -> list[Damage]:
    """The damage of one dataset (what ``standardize --repair`` re-creates): one ``Damage`` per damaged
    shard, with its split and shard number, and any metadata problem with ``shard`` None. Empty: sound."""
    return verify_store(store, dataset, workers=workers, progress=False).damage


def _bad_json(store: Path, name: str, exc: Exception) -> str:
    return f"{store / name / 'zarr.json'}: the dataset's metadata does not load ({exc})"


def _collect(results, bar, report: VerifyReport) -> list[Damage]:
    found = []
    for damage, task, nbytes in results:
        report.nbytes += nbytes
        bar.update(task.nbytes)
        if damage is not None:
            found.append(damage)
    return found


def _check(task: _Task) -> tuple[Damage | None, _Task, int]:
    """Read and check one whole shard file: (its damage or None, the task, the bytes read)."""
    path = task.reader.shard_path(task.shard)
    try:
        nbytes = os.stat(path).st_size
    except FileNotFoundError:
        nbytes = 0
    problems = task.reader.verify(task.shard)
    if problems and 0 < nbytes != task.nbytes:  # say plainly what the lost index only hints at
        what = "is truncated" if nbytes < task.nbytes else "is longer than a sound shard"
        problems.insert(0, f"{path}: {what} ({nbytes} bytes, a sound shard of its patches has {task.nbytes})")
    damage = Damage(task.dataset, task.split, task.shard, str(path), problems) if problems else None
    return damage, task, nbytes


def _plan_dataset(store: Path, name: str, attrs: dict, report: VerifyReport) -> list[_Task]:
    """The metadata checks of one dataset (their damage goes to ``report``) and its shards to read."""
    counts = attrs.get("counts")
    if not isinstance(counts, dict):
        path = store / name / "zarr.json"
        report.damage.append(Damage(name, None, None, str(path), [f"{path}: the dataset's attrs have no counts"]))
        return []
    tasks = []
    for split in (s for s in SPLITS if s in counts):
        report.splits += 1
        n = int(counts[split])
        images = images_dir(store, name, split)
        reader = ShardedReader(images)
        meta = images / "zarr.json"
        try:
            shape = reader.shape
        except (UserError, ValueError, OSError) as exc:  # missing, not JSON, not the sharded layout
            report.damage.append(Damage(name, split, None, str(meta), [f"{meta}: does not load ({exc})"]))
            continue
        report.patches += shape[0]
        problems = []
        if shape[0] != n:
            problems.append(f"{meta}: holds {shape[0]} patches, the dataset's attrs count {n}")
        content = attrs.get("content_size")
        if list(shape[1:3]) != content:
            problems.append(f"{meta}: content of {shape[1]}x{shape[2]} px, the dataset's attrs say {content}")
        if "shard_size" in attrs and reader.shard_size != attrs["shard_size"]:
            problems.append(f"{meta}: {reader.shard_size} patches per shard, the attrs say {attrs['shard_size']}")
        if problems:
            report.damage.append(Damage(name, split, None, str(meta), problems))
        for array in META_ARRAYS:
            bad = _check_meta_array(images.parent / array, shape[0])
            if bad:
                report.damage.append(Damage(name, split, None, str(images.parent / array), bad))
        count = shard_count(shape[0], reader.shard_size)
        report.damage += _stray_shards(name, split, images, count, shape[0])
        tasks += [_Task(name, split, s, reader, reader.shard_nbytes(s)) for s in range(count)]
    return tasks


def _check_meta_array(path: Path, n: int) -> list[str]:
    """Problems of a labels, source_id or box array: it loads, has ``n`` rows, and its chunks decode. (A
    missing chunk file is not damage here: zarr writes no chunk that holds only the fill value, 0.)"""
    try:
        arr = zarr.open_array(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a missing or bad zarr.json
        return [f"{path}: does not load ({type(exc).__name__}: {exc})"]
    if not arr.shape or arr.shape[0] != n:
        return [f"{path}: shape {list(arr.shape)}, expected {n} rows (one per patch)"]
    try:
        np.asarray(arr[...])
    except Exception as exc:  # a truncated or corrupted chunk fails to decode
        return [f"{path}: does not decode ({type(exc).__name__}: {exc})"]
    return []


def _stray_shards(name: str, split: str, images: Path, count: int, n: int) -> list[Damage]:
    """Shard files numbered at or beyond ``count``: not part of the array (it holds ``n`` patches)."""
    found = []
    with os.scandir(images) as entries:
        for entry in entries:
            m = _SHARD_FILE.fullmatch(entry.name)
            if m and int(m.group(1)) >= count:
                take = f"shards 0 to {count - 1}" if count else "no shard"
                problem = f"{entry.path}: a stray shard file: the array's {n} patches take {take}"
                found.append(Damage(name, split, None, entry.path, [problem]))
    return found
