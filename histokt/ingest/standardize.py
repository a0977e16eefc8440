"""`histokt standardize`: raw dataset -> standardized patches in the store, in parallel and resumable.

Flow: the card indexes the raw sources (no decoding) -> sources get their split (grouped, before tiling)
-> the sorted sources are cut into parts whose boundaries depend only on the data, never on the shard
or worker count; all of this is the worklist (staging/worklist.json) -> each part is decoded, rescaled,
padded, tiled and filtered; its kept patches' content (unpadded) goes into one packed data file
(``parts/pNNNNNN.bin``, written atomically: a few files per part, never one per patch, so standardizing
stays within inode quotas) and it ends with an atomically written manifest (rows, content sizes, CRC32Cs)
-> once every part has its manifest, one process finalizes (histokt.ingest.finalize): it packs the parts
into the split arrays' shard files, writes labels, provenance and attrs, and renames the finished dataset
into the store in one step.

A part is the unit of resume: a part without a manifest is redone from scratch, so a run killed at any
moment and started again produces the same store, byte for byte.

A part is also the unit of ownership: a process works on a part only while it holds the part's lease
(``parts/pNNNNNN.lease``, histokt.lease, heart-beating while it works), so the same command started
twice (an array resubmitted, a rerun by hand while a job still runs) never has two writers on one part.
A part held by a live other process is skipped, not waited for: the holder finishes it and, if it is the
last to finish, publishes the dataset; waiting would only burn this job's allocation. A part whose lease
is stale (its writer died) or absent, and which has no manifest, is redone from scratch.
"""

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import google_crc32c
import numpy as np
from tqdm import tqdm

from histokt import atomic, lease
from histokt.errors import UserError, on_full_disk
from histokt.ingest.cards import CARD_NAMES, card_class, get_card, parse_options
from histokt.ingest.cards.base import Card, CardIndex, Label, Source
from histokt.ingest.decode import MAX_PIXELS, BadImage
from histokt.ingest.finalize import dataset_attrs, finalize_locked, part_dir, remove_staging
from histokt.ingest.records import PartManifest, PatchRow, SourceRow, StandardizeResult, Worklist
from histokt.ingest.repair import repair
from histokt.ingest.splits import SPLIT_RULES, check_split_plan, grouped_splits
from histokt.ingest.tiling import FilterParams, is_low_contrast, mirror_pad, rescale, tile_boxes
from histokt.store.schema import FORMAT, SPLITS, staging_dir
from histokt.store.shards import SHARD_SIZE, shard_count, shard_nbytes, shard_path

# a part lease of another host whose heartbeat (every tenth of this) is this old belongs to a dead writer
PART_STALE_S = lease.DEFAULT_STALE_S
DEFAULT_STRIDE = 204  # int(272 * (1 - 0.25)): HistoKT's 25 % overlap
# The root group's metadata, as zarr writes it; written atomically here because shards start concurrently.
ROOT_METADATA = json.dumps({"attributes": {}, "zarr_format": 3, "node_type": "group"}, indent=2).encode()


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
    patches_per_file: int = field(
        default=SHARD_SIZE,
        metadata={"help": f"patches per shard file of the store (default {SHARD_SIZE}; fewer, larger files: more)"},
    )
    repair: bool = field(
        default=False,
        metadata={
            "help": "re-create the damaged shard files of a finished dataset (see histokt verify) from the raw "
            "data, with the dataset's original options; the rest of the store is not touched"
        },
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar (--no-progress to hide)"})
    filter: bool = field(
        default=True,
        metadata={
            "help": "drop low-contrast (blank) patches, HistoKT's is_low_contrast rule (default); --no-filter "
            "keeps every window, for parity runs of ADP, which HistoKT used as released, unfiltered "
            "(recorded as attrs filter: null)"
        },
    )


@dataclass(frozen=True)
class Params:
    """Everything a worker needs to turn sources into patches; pickled into each worker process."""

    scale: float
    patch_size: int
    stride: int
    filter: FilterParams | None  # None: --no-filter, every window kept
    strict: bool
    max_pixels: int


# -- the worklist -------------------------------------------------------------------------------------------


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
    if cfg.patches_per_file < 1:
        raise UserError(f"--patches-per-file {cfg.patches_per_file}: must be at least 1")
    if cfg.repair and cfg.overwrite:
        raise UserError("--repair and --overwrite: choose one (--repair mends a dataset, --overwrite replaces it)")
    if cfg.max_per_class is not None and cfg.max_per_class < 1:
        raise UserError(f"--max-per-class {cfg.max_per_class}: must be at least 1")
    name = cfg.name or cfg.dataset
    if not name or name.startswith(".") or "/" in name or name in SPLITS:
        raise UserError(f"--name {name!r}: use a plain name without '/' or a leading '.'")
    store = Path(cfg.store)
    for where in (store, *store.absolute().parents):  # the store, or its nearest existing folder
        if where.exists() or where.is_symlink():
            if not where.is_dir():
                raise UserError(
                    f"--store {cfg.store}: {where} is a file, not a folder; "
                    f"give the path of a zarr store folder (new or existing)"
                )
            break


def part_size(n_sources: int) -> int:
    """Sources per part: about 64 parts, 1..512 each; depends only on the data, so any shard count agrees."""
    return max(1, min(512, math.ceil(n_sources / 64)))


def make_worklist(cfg: StandardizeConfig) -> tuple[Card, Worklist]:
    """Index the raw data and decide everything that does not need pixels; returns (card, worklist)."""
    check_config(cfg)
    card = get_card(cfg.dataset, parse_options(card_class(cfg.dataset), cfg.option))
    card.max_pixels = cfg.max_pixels
    mpp = cfg.mpp if cfg.mpp is not None else card.mpp
    if mpp is None:
        raise UserError(f"card {cfg.dataset} has no known µm/px: pass --mpp (the scanner's µm per pixel)")
    raw = Path(cfg.raw).resolve()
    index = card.index(raw)
    sources = _chosen_sources(cfg, index, raw)
    check_split_plan(index.split_plan, {s.partition for s in sources}, cfg.dataset)
    if cfg.split_rule == "grouped":
        splits: list[str | None] = list(grouped_splits(sources, index.split_plan, cfg.split_seed))
    else:
        splits = [None] * len(sources)
    rows = [SourceRow(s.path, s.label, s.partition, s.group, sp) for s, sp in zip(sources, splits)]
    settings = _settings(cfg, card, index, mpp)
    size = part_size(len(sources))
    return card, Worklist(
        fingerprint=_fingerprint(settings, card, rows),
        settings=settings,
        classes=list(index.classes),
        multi_label=index.multi_label,
        group_rule=index.group_rule,
        warnings=index.count_warnings(sources),
        sources=rows,
        parts=[(a, min(a + size, len(sources))) for a in range(0, len(sources), size)],
    )


def _chosen_sources(cfg: StandardizeConfig, index: CardIndex, raw: Path) -> list[Source]:
    """The indexed sources, at most --max-per-class of each class; each listed once."""
    sources = list(index.sources)
    if not sources:
        raise UserError(f"{cfg.dataset}: {raw}: no images found; verify the download")
    if cfg.max_per_class is not None:
        sources = subsample(sources, cfg.max_per_class, cfg.split_seed)
    paths = [s.path for s in sources]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise UserError(f"{cfg.dataset}: {raw / dup}: listed twice; verify the download")
    return sources


def _settings(cfg: StandardizeConfig, card: Card, index: CardIndex, mpp: float) -> dict[str, Any]:
    """The settings recorded in the dataset's attrs (and, with the sources, its fingerprint)."""
    # the card's overlap (25 %, BCSS 75 %) at whatever patch size
    stride = cfg.stride or round((card.default_stride or DEFAULT_STRIDE) * cfg.patch_size / 272)
    settings: dict[str, Any] = {
        "card": card.describe(),
        "mpp_native": mpp,
        "mpp_source": "--mpp" if cfg.mpp is not None else card.mpp_source,
        "mpp_target": cfg.target_mpp,
        "patch_size": cfg.patch_size,
        "stride": stride,
        # --no-filter: null (the key stays, so a reader cannot mistake an unfiltered store for a filtered one)
        "filter": asdict(FilterParams()) if cfg.filter else None,
        "split_rule": cfg.split_rule,
        "split_seed": cfg.split_seed,
        "split_plan": index.split_plan,
        "max_pixels": cfg.max_pixels,
        "strict": cfg.strict,
    }
    if cfg.max_per_class is not None:  # only when set: stores made before the option keep their fingerprint
        settings["max_per_class"] = cfg.max_per_class
    if cfg.patches_per_file != SHARD_SIZE:  # likewise
        settings["shard_size"] = cfg.patches_per_file
    return settings


def _fingerprint(settings: dict[str, Any], card: Card, rows: list[SourceRow]) -> str:
    # the identity hashes only the card options that were set: a card option added later, at its default,
    # leaves the fingerprints of datasets already standardized unchanged
    identity = {**settings, "card": {"card": card.name, "options": card.options_set()}}
    listing = [r.to_json() for r in rows]
    return hashlib.sha256(json.dumps([identity, listing], sort_keys=True).encode()).hexdigest()[:16]


def subsample(sources: list[Source], n: int, seed: int) -> list[Source]:
    """At most ``n`` sources of each (official partition, label), chosen by a seeded shuffle; order kept.

    Per partition, so that an official test set is never emptied; mask-labelled sources (label None) count
    as one class."""
    by_key: dict[tuple[str, str], list[int]] = {}
    for i, s in enumerate(sources):
        by_key.setdefault((s.partition, repr(s.label)), []).append(i)
    rng = np.random.default_rng(seed)
    keep: set[int] = set()
    for key in sorted(by_key):
        members = by_key[key]
        keep.update(members if len(members) <= n else rng.choice(members, n, replace=False).tolist())
    return [s for i, s in enumerate(sources) if i in keep]


# -- processing one part ------------------------------------------------------------------------------------


@dataclass
class PartTask:
    raw: Path
    card: Card
    params: Params
    base: Path  # the part's base path: .bin its data file, .json its manifest, .lease its lease
    first: int  # index of the part's first source in the worklist
    sources: list[SourceRow]  # the worklist rows of this part


def process_part(task: PartTask) -> dict[str, Any]:
    """Standardize one part into its data file, then write its manifest (the part's done marker), while
    holding the part's lease. Returns its counts; ``held``: another live process is writing it (skipped);
    ``skipped``: the part was done meanwhile, or the staging folder is gone (published)."""
    path = task.base.with_suffix(".lease")
    for _ in range(2):  # a lease released between our try and our read of its holder: try once more
        try:
            mine = lease.Lease.acquire(path, stale_after=PART_STALE_S)
        except FileNotFoundError:  # the staging folder is gone: another process published the dataset
            return {"patches": 0, "sources": 0, "skipped": True}
        if mine is not None:
            break
        holder = lease.read(path)
        if holder is not None:
            return {"patches": 0, "sources": 0, "held": True}
    else:  # taken and released twice in a row by others: theirs to finish (reported as missing)
        return {"patches": 0, "sources": 0, "skipped": True}
    try:
        if task.base.with_suffix(".json").is_file():  # finished by another process meanwhile
            return {"patches": 0, "sources": 0, "skipped": True}
        with mine.beating():
            _clear_part(task.base)  # a dead writer's leftovers: redone from scratch
            return _write_part(task)
    finally:
        mine.release()


def _clear_part(base: Path) -> None:
    """Remove a part's data file and the temporaries of writers that died while writing it."""
    base.with_suffix(".bin").unlink(missing_ok=True)
    for tmp in base.parent.glob(f".{base.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
    if base.is_dir():  # a part staged by histokt < 0.2 (one file per patch)
        shutil.rmtree(base)


def _write_part(task: PartTask) -> dict[str, Any]:
    patches: list[PatchRow] = []
    content: list[tuple[int, int]] = []
    crcs: list[int] = []
    rejected: list[dict[str, str]] = []
    with atomic.atomic_path(task.base.with_suffix(".bin")) as tmp, open(tmp, "wb") as f:
        for offset, row in enumerate(task.sources):
            source = Source(row.path, row.label, row.partition, row.group)
            try:
                tiles = list(_tiles(task, source))
            except BadImage as exc:
                if task.params.strict:
                    raise UserError(f"{Path(task.raw) / row.path}: {exc} (--strict)") from None
                rejected.append({"path": row.path, "reason": str(exc)})
                continue
            for box, data, hw, patch_label in tiles:
                f.write(data)
                crcs.append(google_crc32c.value(data))
                content.append(hw)
                patches.append(PatchRow(task.first + offset, box, patch_label, row.partition, row.split))
    atomic.write_json(task.base.with_suffix(".json"), PartManifest(patches, rejected, content, crcs).to_json())
    return {"patches": len(patches), "sources": len(task.sources)}


def _tiles(task: PartTask, source: Source) -> Iterator[tuple[tuple[int, int, int, int], bytes, tuple[int, int], Label]]:
    """Yield (box, content bytes, content (h, w), label) for the kept patches of one source.

    The content is the patch without its mirror padding: the source is padded only where it is smaller
    than the patch, and then has a single tile along that side, so the top-left min(side, P) pixels are
    the content and padding them again (``shards.pad_on_read``) gives the patch back, pixel for pixel."""
    p = task.params
    rescaled = rescale(task.card.read(task.raw, source), p.scale)
    ch, cw = min(rescaled.shape[0], p.patch_size), min(rescaled.shape[1], p.patch_size)
    image = mirror_pad(rescaled, p.patch_size)
    mask = task.card.rescaled_mask(task.raw, source, p.scale)
    if mask is not None:
        mask = mirror_pad(mask, p.patch_size)
    for x0, y0, x1, y1 in tile_boxes(image.shape[0], image.shape[1], p.patch_size, p.stride):
        patch = image[y0:y1, x0:x1]
        if p.filter is not None and is_low_contrast(patch, p.filter):
            continue
        label = source.label
        if mask is not None:
            label = task.card.mask_label(mask[y0:y1, x0:x1])
            if label is None:
                continue
        yield (x0, y0, x1, y1), np.ascontiguousarray(patch[:ch, :cw]).tobytes(), (ch, cw), label


# -- the command --------------------------------------------------------------------------------------------


def standardize(cfg: StandardizeConfig) -> StandardizeResult:
    """Run (or resume) this shard's parts and finalize when every part is done; returns what happened.

    A full disk or an exceeded quota anywhere ends in one UserError naming the path; the same call resumes."""
    with on_full_disk(cfg.store):
        return _standardize(cfg)


def _standardize(cfg: StandardizeConfig) -> StandardizeResult:
    shard, nshards = parse_shard(cfg.shard)
    card, worklist = make_worklist(cfg)
    name = cfg.name or cfg.dataset
    store = Path(cfg.store)
    final = store / name
    existing = dataset_attrs(final)
    if existing is None and cfg.repair:
        raise UserError(f"{final}: no such dataset to repair; run without --repair to standardize it")
    if existing is not None:
        same = existing.get("fingerprint") == worklist.fingerprint
        current = same and existing.get("format") == FORMAT
        if existing.get("format") != FORMAT and not cfg.overwrite:
            raise UserError(
                f"{final}: holds dataset {name!r} in store format {existing.get('format')}; convert the store with "
                f"'histokt store upgrade {store} NEW_STORE', or pass --overwrite to standardize it again here"
            )
        if cfg.repair and not same:
            raise UserError(
                f"{final}: dataset {name!r} was made with {_describe(existing)}; --repair needs its original "
                f"options (the same card, raw files and options)"
            )
        if current and not cfg.repair and not (cfg.overwrite and _damaged(final, existing)):
            # a kill between the final rename and the clean-up leaves the staging folder behind
            remove_staging(staging_dir(store, name))
            return StandardizeResult(name, "done", counts=existing["counts"])
        if same and not cfg.repair:  # --overwrite of a damaged or format-1 dataset: rebuilt
            leftover = staging_dir(store, name)
            if (leftover / "final.ready").is_file() and not (leftover / "final").exists():
                remove_staging(leftover)  # the published run's leftovers: its final folder was moved out
        elif not same and not cfg.overwrite:
            raise UserError(
                f"{final}: already holds dataset {name!r} made with {_describe(existing)}; "
                f"pass --overwrite to replace it, or --name to store this one beside it"
            )
    staging = _prepare_staging(store, name, worklist, cfg.overwrite)
    params = Params(
        scale=worklist.settings["mpp_native"] / cfg.target_mpp,
        patch_size=cfg.patch_size,
        stride=worklist.settings["stride"],
        filter=None if worklist.settings["filter"] is None else FilterParams(**worklist.settings["filter"]),
        strict=cfg.strict,
        max_pixels=cfg.max_pixels,
    )
    raw = Path(cfg.raw).resolve()

    def task(k: int) -> PartTask:
        a, b = worklist.parts[k]
        return PartTask(raw, card, params, part_dir(staging, k), a, worklist.sources[a:b])

    if cfg.repair:
        assert existing is not None

        def run(parts: list[int]) -> None:
            _run_parts([task(k) for k in parts], cfg.workers, cfg.progress, f"{name} repair")

        return repair(store, name, staging, worklist, existing, run, cfg.workers)
    todo = [task(k) for k in range(len(worklist.parts)) if k % nshards == shard and not _part_done(staging, k)]
    try:
        written = _run_parts(todo, cfg.workers, cfg.progress, f"{name} shard {shard}/{nshards}")
    except UserError:
        if nshards == 1:  # nothing half-written stays behind a fatal --strict error
            remove_staging(staging)
        raise
    missing = [k for k in range(len(worklist.parts)) if not _part_done(staging, k)]
    if missing:
        done = dataset_attrs(final)
        if done is not None and done.get("fingerprint") == worklist.fingerprint:  # published by another
            return StandardizeResult(name, "done", counts=done["counts"])
        # parts of ours that other live processes are writing now: they finish them, the last publishes
        held = [h for k in missing if k % nshards == shard and (h := _live_holder(staging, k)) is not None]
        if not held:
            return StandardizeResult(name, "partial", parts_missing=len(missing))
        holders = {h.who(): h.describe() for h in sorted(held, key=lambda h: h.heartbeat)}
        return StandardizeResult(
            name,
            "busy" if written == 0 else "partial",
            parts_missing=len(missing),
            parts_held=len(held),
            held_by=sorted(holders.values()),
        )

    def redo(parts: list[int]) -> None:  # parts found damaged while publishing: redone under the lock
        _run_parts([task(k) for k in parts], cfg.workers, False, f"{name} redo")

    return finalize_locked(store, name, staging, worklist, redo=redo, workers=cfg.workers)


def _part_done(staging: Path, k: int) -> bool:
    return part_dir(staging, k).with_suffix(".json").is_file()


def _live_holder(staging: Path, k: int) -> lease.Holder | None:
    """Who holds part k's lease, where it is held and not stale."""
    return lease.live(part_dir(staging, k).with_suffix(".lease"), PART_STALE_S)


def _damaged(final: Path, attrs: dict) -> bool:
    """Whether a finished dataset lacks a shard file or has one of the wrong size (a stat each)."""
    counts, content = attrs.get("counts"), attrs.get("content_size")
    if not isinstance(counts, dict) or not isinstance(content, list):
        return False
    size = int(attrs.get("shard_size", SHARD_SIZE))
    for split, n in counts.items():
        for s in range(shard_count(n, size)):
            expected = shard_nbytes(min(size, n - s * size), content[0], content[1], size)
            try:
                if os.stat(shard_path(final / split / "images", s)).st_size != expected:
                    return True
            except FileNotFoundError:
                return True
    return False


def _describe(attrs: dict) -> str:
    card = attrs.get("card", {})
    return f"card {card.get('card')!r} options {card.get('options')} (fingerprint {attrs.get('fingerprint')})"


def _prepare_staging(store: Path, name: str, worklist: Worklist, overwrite: bool) -> Path:
    """The staging folder of this dataset, holding a worklist identical to ours (or refused)."""
    staging = staging_dir(store, name)
    old = atomic.read_json(staging / "worklist.json")
    if old is not None and old["fingerprint"] != worklist.fingerprint:
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
    if old is None or old["fingerprint"] != worklist.fingerprint:
        atomic.write_json(staging / "worklist.json", worklist.to_json())
    return staging


def _run_parts(todo: list[PartTask], workers: int, progress: bool, desc: str) -> int:
    """Do the parts that no other live process holds; returns how many this process wrote."""
    # disable=None: a bar on a terminal, silence in batch logs
    bar = tqdm(total=len(todo), desc=desc, unit="part", disable=None if progress and todo else True, file=sys.stderr)
    patches, written = 0, 0

    def count(r: dict[str, Any]) -> None:
        nonlocal patches, written
        written += not (r.get("held") or r.get("skipped"))
        patches += r["patches"]
        bar.set_postfix(patches=patches)
        bar.update()

    if workers == 1 or len(todo) <= 1:
        for r in map(process_part, todo):
            count(r)
    else:
        ctx = multiprocessing.get_context("spawn")  # zarr's IO thread must not be forked
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
            for r in pool.map(process_part, todo):
                count(r)
    bar.close()
    return written
