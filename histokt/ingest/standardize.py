"""`histokt standardize`: raw dataset -> standardized patches in the store, in parallel and resumable.

Flow: the card indexes the raw sources (no decoding) -> sources get their split (grouped, before tiling)
-> the sorted sources are cut into parts whose boundaries depend only on the data, never on the shard
or worker count -> each part is decoded, rescaled, padded, tiled and filtered into its own staging array
and ends with an atomically written manifest -> once every part has its manifest, one process
finalizes: it moves the patch chunk files into the split arrays (a rename, no copy), writes labels,
provenance and attrs, and renames the finished dataset into the store in one step.

A part is the unit of resume: a part without a manifest is redone from scratch, so a run killed at any
moment and started again produces the same store, byte for byte.
"""

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import socket
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import zarr
from tqdm import tqdm

from histokt import __version__, atomic
from histokt.errors import UserError
from histokt.ingest.cards import CARD_NAMES, card_class, get_card, parse_options
from histokt.ingest.decode import MAX_PIXELS, BadImage
from histokt.ingest.splits import SPLIT_RULES, check_plan, grouped_splits, patch_splits
from histokt.ingest.tiling import FilterParams, is_low_contrast, mirror_pad, rescale, tile_boxes
from histokt.store.schema import (
    FORMAT,
    SPLITS,
    chunk_dir,
    patch_array,
    small_array,
    staging_dir,
    string_array,
    write_chunk,
)

DEFAULT_STRIDE = 204  # int(272 * (1 - 0.25)): HistoKT's 25 % overlap
LOCK_STALE_S = 600
# The root group's metadata, as zarr writes it; written atomically here because shards start concurrently.
ROOT_METADATA = json.dumps(
    {"attributes": {}, "zarr_format": 3, "node_type": "group"}, indent=2
).encode()  # a finalize lock untouched this long belongs to a dead process


@dataclass
class StandardizeConfig:
    """Options of `histokt standardize` (also usable from Python)."""

    dataset: str = field(metadata={"help": f"dataset card: {', '.join(CARD_NAMES)}", "choices": CARD_NAMES})
    raw: Path = field(metadata={"help": "the raw dataset folder, as downloaded (see README: preparing datasets)"})
    store: Path = field(metadata={"help": "the Zarr store to write into (created if absent), e.g. data/store.zarr"})
    name: Optional[str] = field(default=None, metadata={"help": "dataset name in the store (default: the card name)"})
    mpp: Optional[float] = field(
        default=None, metadata={"help": "native µm/px, overriding the card's (required for folder and csv)"}
    )
    target_mpp: float = field(default=1.0, metadata={"help": "µm/px of the standardized patches (default 1.0)"})
    patch_size: int = field(default=272, metadata={"help": "patch side in pixels (default 272)"})
    stride: Optional[int] = field(
        default=None, metadata={"help": "tiling stride (default: 25%% overlap, 204 at 272 px; BCSS card: 75%%, 68)"}
    )
    split_seed: int = field(default=0, metadata={"help": "seed of the grouped train/valid/test cut (default 0)"})
    split_rule: str = field(
        default="grouped",
        metadata={
            "choices": SPLIT_RULES,
            "help": "grouped (default): official splits, else whole source groups per split, cut before tiling; "
            "patch: HistoKT's leaky patch-level shuffle, for parity runs only",
        },
    )
    shard: str = field(
        default="0/1", metadata={"help": "I/N: this process does part I of N (SLURM array tasks); default 0/1"}
    )
    workers: int = field(default=1, metadata={"help": "worker processes in this shard (default 1)"})
    strict: bool = field(default=False, metadata={"help": "a bad image stops the run (default: skip, list it)"})
    overwrite: bool = field(
        default=False, metadata={"help": "replace a dataset of the same name made with another card or options"}
    )
    option: list[str] = field(
        default_factory=list, metadata={"nargs": "*", "help": "card options KEY=VALUE (e.g. classes=9 for crc)"}
    )
    max_pixels: int = field(default=MAX_PIXELS, metadata={"help": f"largest image accepted (default {MAX_PIXELS:,})"})
    max_per_class: Optional[int] = field(
        default=None,
        metadata={
            "help": "use at most N source images per class in each official partition, a "
            "seeded choice (--split-seed): a quick trial on a big download"
        },
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar (--no-progress to hide)"})


@dataclass(frozen=True)
class Params:
    """Everything a worker needs to turn sources into patches; pickled into each worker process."""

    scale: float
    patch_size: int
    stride: int
    filter: FilterParams
    strict: bool
    max_pixels: int


# -- planning -------------------------------------------------------------------------------------------------


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def check_config(cfg: StandardizeConfig) -> None:
    if not Path(cfg.raw).is_dir():
        raise UserError(f"--raw {cfg.raw}: no such folder (point it at the dataset as downloaded)")
    for name, value in (("--mpp", cfg.mpp), ("--target-mpp", cfg.target_mpp)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"{name} {value}: must be a positive number of µm per pixel")
    if cfg.patch_size < 8:
        raise UserError(f"--patch-size {cfg.patch_size}: must be at least 8")
    if cfg.stride is not None and cfg.stride < 1:
        raise UserError(f"--stride {cfg.stride}: must be at least 1")
    if cfg.workers < 1:
        raise UserError(f"--workers {cfg.workers}: must be at least 1")
    if cfg.max_per_class is not None and cfg.max_per_class < 1:
        raise UserError(f"--max-per-class {cfg.max_per_class}: must be at least 1")
    name = cfg.name or cfg.dataset
    if not name or name.startswith(".") or "/" in name or name in SPLITS:
        raise UserError(f"--name {name!r}: use a plain name without '/' or a leading '.'")


def part_size(n_sources: int) -> int:
    """Sources per part: about 64 parts, 1..512 each; depends only on the data, so any shard count agrees."""
    return max(1, min(512, math.ceil(n_sources / 64)))


def make_plan(cfg: StandardizeConfig):
    """Index the raw data and decide everything that does not need pixels; returns (card, plan dict)."""
    check_config(cfg)
    card = get_card(cfg.dataset, parse_options(card_class(cfg.dataset), cfg.option))
    card.max_pixels = cfg.max_pixels
    mpp = cfg.mpp if cfg.mpp is not None else card.mpp
    if mpp is None:
        raise UserError(f"card {cfg.dataset} has no known µm/px: pass --mpp (the scanner's µm per pixel)")
    raw = Path(cfg.raw).resolve()
    sources = card.index(raw)
    if not sources:
        raise UserError(f"{cfg.dataset}: {raw}: no images found; verify the download")
    if cfg.max_per_class is not None:
        sources = subsample(sources, cfg.max_per_class, cfg.split_seed)
    paths = [s.path for s in sources]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise UserError(f"{cfg.dataset}: {raw / dup}: listed twice; verify the download")
    plan = card.split_plan
    check_plan(plan, {s.partition for s in sources}, cfg.dataset)
    splits = grouped_splits(sources, plan, cfg.split_seed) if cfg.split_rule == "grouped" else [None] * len(sources)
    # the card's overlap (25 %, BCSS 75 %) at whatever patch size
    stride = cfg.stride or round((card.default_stride or DEFAULT_STRIDE) * cfg.patch_size / 272)
    size = part_size(len(sources))
    settings = {
        "card": card.describe(),
        "mpp_native": mpp,
        "mpp_source": "--mpp" if cfg.mpp is not None else card.mpp_source,
        "mpp_target": cfg.target_mpp,
        "patch_size": cfg.patch_size,
        "stride": stride,
        "filter": asdict(FilterParams()),
        "split_rule": cfg.split_rule,
        "split_seed": cfg.split_seed,
        "split_plan": plan,
        "max_pixels": cfg.max_pixels,
        "strict": cfg.strict,
    }
    if cfg.max_per_class is not None:  # only when set: stores made before the option keep their fingerprint
        settings["max_per_class"] = cfg.max_per_class
    listing = [[s.path, _json_label(s.label), s.partition, s.group, sp] for s, sp in zip(sources, splits)]
    # the identity hashes only the card options that were set: a card option added later, at its default,
    # leaves the fingerprints of datasets already standardized unchanged
    identity = {**settings, "card": {"card": card.name, "options": card.options_set()}}
    digest = hashlib.sha256(json.dumps([identity, listing], sort_keys=True).encode()).hexdigest()[:16]
    return card, {
        "fingerprint": digest,
        "settings": settings,
        "classes": list(card.classes),
        "multi_label": card.multi_label,
        "group_rule": card.group_rule,
        "warnings": card.count_warnings(sources),
        "sources": listing,
        "parts": [[a, min(a + size, len(sources))] for a in range(0, len(sources), size)],
    }


def subsample(sources: list, n: int, seed: int) -> list:
    """At most ``n`` sources of each (official partition, label), chosen by a seeded shuffle; order kept.

    Per partition, so that an official test set is never emptied; mask-labelled sources (label None) count
    as one class."""
    by_key: dict = {}
    for i, s in enumerate(sources):
        by_key.setdefault((s.partition, repr(s.label)), []).append(i)
    rng = np.random.default_rng(seed)
    keep = set()
    for key in sorted(by_key):
        members = by_key[key]
        keep.update(members if len(members) <= n else rng.choice(members, n, replace=False).tolist())
    return [s for i, s in enumerate(sources) if i in keep]


def _json_label(label):
    return list(label) if isinstance(label, tuple) else label


# -- processing one part ------------------------------------------------------------------------------------


@dataclass
class PartTask:
    raw: Path
    card: object
    params: Params
    directory: Path  # the part's staging array; its manifest is directory.with_suffix(".json")
    first: int  # index of the part's first source in the plan
    sources: list  # the plan rows of this part


def process_part(task: PartTask) -> dict:
    """Standardize one part into its staging array, then write its manifest (the part's done marker)."""
    from histokt.ingest.cards.base import Source  # local: keeps worker start-up imports small

    patch_array(task.directory, 1 << 40, task.params.patch_size)  # metadata only; chunks written below
    patches, rejected, k = [], [], 0
    for offset, (path, label, partition, group, split) in enumerate(task.sources):
        source = Source(path, tuple(label) if isinstance(label, list) else label, partition, group)
        try:
            tiles = list(_tiles(task, source))
        except BadImage as exc:
            if task.params.strict:
                raise UserError(f"{Path(task.raw) / path}: {exc} (--strict)") from None
            rejected.append({"path": path, "reason": str(exc)})
            continue
        for box, patch, patch_label in tiles:
            write_chunk(task.directory, k, patch)
            patches.append([task.first + offset, *box, _json_label(patch_label), partition, split])
            k += 1
    manifest = {"patches": patches, "rejected": rejected}
    atomic.write_json(task.directory.with_suffix(".json"), manifest)
    return {"patches": len(patches), "sources": len(task.sources)}


def _tiles(task: PartTask, source):
    """Yield (box, patch, label) for the kept patches of one source."""
    p = task.params
    image = mirror_pad(rescale(task.card.read(task.raw, source), p.scale), p.patch_size)
    mask = task.card.read_mask(task.raw, source)
    if mask is not None:
        mask = mirror_pad(rescale(mask, p.scale, labels=True), p.patch_size)
    for x0, y0, x1, y1 in tile_boxes(image.shape[0], image.shape[1], p.patch_size, p.stride):
        patch = image[y0:y1, x0:x1]
        if is_low_contrast(patch, p.filter):
            continue
        label = source.label
        if mask is not None:
            label = task.card.mask_label(mask[y0:y1, x0:x1])
            if label is None:
                continue
        yield (x0, y0, x1, y1), np.ascontiguousarray(patch), label


# -- the command --------------------------------------------------------------------------------------------


def standardize(cfg: StandardizeConfig) -> dict:
    """Run (or resume) this shard's parts and finalize when every part is done; returns a summary."""
    shard, nshards = parse_shard(cfg.shard)
    card, plan = make_plan(cfg)
    name = cfg.name or cfg.dataset
    store = Path(cfg.store)
    final = store / name
    existing = _attrs(final)
    if existing is not None:
        if existing.get("fingerprint") == plan["fingerprint"]:
            # a kill between the final rename and the clean-up leaves the staging folder behind
            _remove_staging(staging_dir(store, name))
            return {"dataset": name, "status": "done", "counts": existing["counts"]}
        if not cfg.overwrite:
            raise UserError(
                f"{final}: already holds dataset {name!r} made with {_describe(existing)}; "
                f"pass --overwrite to replace it, or --name to store this one beside it"
            )
    staging = _prepare_staging(store, name, plan, cfg.overwrite)
    params = Params(
        scale=plan["settings"]["mpp_native"] / cfg.target_mpp,
        patch_size=cfg.patch_size,
        stride=plan["settings"]["stride"],
        filter=FilterParams(),
        strict=cfg.strict,
        max_pixels=cfg.max_pixels,
    )
    todo = [
        PartTask(Path(cfg.raw).resolve(), card, params, staging / "parts" / f"p{k:06d}", a, plan["sources"][a:b])
        for k, (a, b) in enumerate(plan["parts"])
        if k % nshards == shard and not (staging / "parts" / f"p{k:06d}.json").is_file()
    ]
    try:
        _run_parts(todo, cfg.workers, cfg.progress, f"{name} shard {shard}/{nshards}")
    except UserError:
        if nshards == 1:  # nothing half-written stays behind a fatal --strict error
            _remove_staging(staging)
        raise
    missing = [k for k in range(len(plan["parts"])) if not (staging / "parts" / f"p{k:06d}.json").is_file()]
    if missing:
        return {"dataset": name, "status": "partial", "parts_missing": len(missing)}
    return _finalize_locked(store, name, staging, plan)


def _attrs(path: Path) -> dict | None:
    try:
        return json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except FileNotFoundError:
        return None


def _describe(attrs: dict) -> str:
    card = attrs.get("card", {})
    return f"card {card.get('card')!r} options {card.get('options')} (fingerprint {attrs.get('fingerprint')})"


def _prepare_staging(store: Path, name: str, plan: dict, overwrite: bool) -> Path:
    """The staging folder of this dataset, holding a plan identical to ours (or refused)."""
    staging = staging_dir(store, name)
    old = atomic.read_json(staging / "plan.json")
    if old is not None and old["fingerprint"] != plan["fingerprint"]:
        if not overwrite:
            raise UserError(
                f"{staging}: an unfinished run with other settings or other raw files is in progress "
                f"(fingerprint {old['fingerprint']}); re-run it with its own arguments, or pass --overwrite"
            )
        shutil.rmtree(staging)
    if not (store / "zarr.json").is_file():
        # another shard may be creating the store right now: its temporary zarr.json is not foreign content
        if store.is_dir() and any(not p.name.startswith(".zarr.json.") for p in store.iterdir()):
            raise UserError(f"--store {store}: exists but is not a zarr store; choose a new or existing store path")
        store.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(store / "zarr.json", ROOT_METADATA)  # every shard writes the same bytes
    (staging / "parts").mkdir(parents=True, exist_ok=True)
    if old is None or old["fingerprint"] != plan["fingerprint"]:
        atomic.write_json(staging / "plan.json", plan)
    return staging


def _run_parts(todo: list[PartTask], workers: int, progress: bool, desc: str) -> None:
    # disable=None: a bar on a terminal, silence in batch logs
    bar = tqdm(total=len(todo), desc=desc, unit="part", disable=None if progress and todo else True, file=sys.stderr)
    patches = 0
    if workers == 1 or len(todo) <= 1:
        results = map(process_part, todo)
        for r in results:
            patches += r["patches"]
            bar.set_postfix(patches=patches)
            bar.update()
    else:
        ctx = multiprocessing.get_context("spawn")  # zarr's IO thread must not be forked
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
            for r in pool.map(process_part, todo):
                patches += r["patches"]
                bar.set_postfix(patches=patches)
                bar.update()
    bar.close()


# -- finalize ------------------------------------------------------------------------------------------------


def _finalize_locked(store: Path, name: str, staging: Path, plan: dict) -> dict:
    lock = staging / "finalize.lock"
    try:
        acquired = _acquire(lock)
    except FileNotFoundError:  # another shard finalized and removed the staging folder meanwhile
        acquired = False
    if not acquired:
        done = _attrs(store / name)
        if done is not None and done.get("fingerprint") == plan["fingerprint"]:
            return {"dataset": name, "status": "done", "counts": done["counts"]}
        try:
            holder = lock.read_text().strip()
        except FileNotFoundError:
            holder = "released"
        return {"dataset": name, "status": "finalizing elsewhere", "lock": holder}
    try:
        return _finalize(store, name, staging, plan)
    finally:
        lock.unlink(missing_ok=True)


def _acquire(lock: Path) -> bool:
    """An exclusive finalize lock; a lock of a dead local process, or an old one, is taken over.

    The lock appears by a hard link of a file already holding its owner: an empty lock, seen between
    creating and writing it, would look stale and let a second process in."""
    me = f"{socket.gethostname()} {os.getpid()} {time.time():.0f}"
    mine = lock.with_name(f"{lock.name}.{socket.gethostname()}.{os.getpid()}")
    mine.write_text(me + "\n")
    try:
        for _ in range(2):
            try:
                os.link(mine, lock)
            except FileExistsError:
                if _stale(lock):
                    lock.unlink(missing_ok=True)
                    continue
                return False
            return True
        return False
    finally:
        mine.unlink(missing_ok=True)


def _stale(lock: Path) -> bool:
    try:
        host, pid, _ = lock.read_text().split()
        age = time.time() - lock.stat().st_mtime
    except (FileNotFoundError, ValueError):
        return True
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return age > LOCK_STALE_S


def _finalize(store: Path, name: str, staging: Path, plan: dict) -> dict:
    manifests = [atomic.read_json(staging / "parts" / f"p{k:06d}.json") for k in range(len(plan["parts"]))]
    rows = [(k, j, row) for k, m in enumerate(manifests) for j, row in enumerate(m["patches"])]
    settings = plan["settings"]
    if settings["split_rule"] == "patch":
        splits = patch_splits([row[6] for _, _, row in rows], settings["split_plan"], settings["split_seed"])
    else:
        splits = [row[7] for _, _, row in rows]
    out = staging / "final"
    ready = staging / "final.ready"
    if not ready.is_file():  # no chunk has moved yet: (re)build the empty layout from scratch
        shutil.rmtree(out, ignore_errors=True)
        root = zarr.open_group(str(out), mode="w", zarr_format=3)
        for split in SPLITS:
            n = splits.count(split)
            root.create_group(split)
            patch_array(out / split / "images", n, settings["patch_size"])
        atomic.write_bytes(ready, b"")
    counts = {}
    for split in SPLITS:
        mine = [r for r, s in zip(rows, splits) if s == split]
        counts[split] = len(mine)
        _move_chunks(staging, out / split / "images", mine)
        _write_meta(zarr.open_group(str(out / split), mode="a"), mine, plan["multi_label"], len(plan["classes"]))
    root = zarr.open_group(str(out), mode="a")
    string_array(root, "sources", [s[0] for s in plan["sources"]])
    rejected = [r for m in manifests for r in m["rejected"]]
    root.attrs.update(
        {
            **{k: v for k, v in settings.items() if k not in ("max_pixels", "strict")},
            "format": FORMAT,
            "classes": plan["classes"],
            "multi_label": plan["multi_label"],
            "group_rule": plan["group_rule"],
            "counts": counts,
            "rejected": rejected,
            "warnings": plan["warnings"],
            "fingerprint": plan["fingerprint"],
            "histokt_version": __version__,
        }
    )
    _swap_in(store, name, out, staging)
    return {"dataset": name, "status": "written", "counts": counts, "rejected": len(rejected)}


def _move_chunks(staging: Path, images: Path, rows) -> None:
    """Rename each patch's chunk folder into place: one rename per patch, no copy. Idempotent, so an
    interrupted finalize resumes: a folder already moved is found at its destination."""
    (images / "c").mkdir(exist_ok=True)
    for index, (k, j, _) in enumerate(rows):
        src = chunk_dir(staging / "parts" / f"p{k:06d}", j)
        dst = chunk_dir(images, index)
        if src.exists():
            os.rename(src, dst)
        elif not dst.exists():
            raise UserError(f"{src}: staged patch is missing; delete {staging} and run again")


def _write_meta(group: zarr.Group, rows, multi_label: bool, n_classes: int) -> None:
    labels = [row[5] for _, _, row in rows]
    if multi_label:
        lab = np.array(labels, dtype=np.uint8).reshape(len(rows), n_classes)
    else:
        lab = np.array(labels, dtype=np.int64).reshape(len(rows))
    small_array(group, "labels", lab)
    small_array(group, "source_id", np.array([row[0] for _, _, row in rows], dtype=np.int64).reshape(len(rows)))
    small_array(group, "box", np.array([row[1:5] for _, _, row in rows], dtype=np.int64).reshape(len(rows), 4))


def _swap_in(store: Path, name: str, out: Path, staging: Path) -> None:
    """Make the dataset visible with one rename; an older dataset of that name is moved aside first."""
    final = store / name
    if final.exists():
        trash = staging / "replaced"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(out, final)
    atomic.fsync_dir(store)
    _remove_staging(staging)


def _remove_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):  # the last dataset of this store to finish removes the shared folder
        staging.parent.rmdir()
