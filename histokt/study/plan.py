"""A spec expanded into cells: one unit of work each, with a stable id and its own run directory.

    RUN_ROOT/spec.toml, RUN_ROOT/plan.json
    RUN_ROOT/cells/<stage>/<cell id>/     the cell's run directory (a train cell's is issue 2's contract)

Ids are built from what the cell computes (stage, dataset, init, mode, lr, seed), so the same spec gives the
same ids, and a cell's directory survives re-planning.
"""

import json
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path

from histokt import atomic, protocol
from histokt.errors import UserError
from histokt.study.spec import STAGES, Dataset, Spec, Stage

PLAN_FORMAT = "histokt-plan/1"


@dataclass
class Cell:
    stage: str
    id: str
    kind: str  # standardize | train | collect
    args: dict = field(default_factory=dict)  # the command's config fields
    inputs: list = field(default_factory=list)  # files that must exist before it can run
    meta: dict = field(default_factory=dict)  # what the collector groups by: family, source, target, mode, lr, seed


# The weights a done training cell keeps (histokt train --keep; a recipe may say otherwise): what a later
# stage reads, nothing more. Transfers and merges read a Stage-A cell's best.pt; the collector reads only
# result.json. For the paper study: 2.4 GB of weights kept instead of 413 GB (benchmarks/checkpoints.py).
KEEP = {"pretrain": "best", "transfer": "none", "distill": "none"}


def cell_dataset(cell: Cell) -> str | None:
    """The dataset a cell trains on or standardizes (the store name); None for the collector."""
    if cell.kind == "standardize":
        return cell.args["name"]
    return cell.args.get("dataset") if cell.kind == "train" else None


def writers(run_root, cells: dict[str, list[Cell]]) -> dict[Path, Cell]:
    """Each cell by its run directory: the cell that writes an input file is ``writers[path.parent]``."""
    root = Path(run_root).absolute()
    return {cell_dir(root, c): c for cs in cells.values() for c in cs}


def lr_name(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def pretrain_id(dataset: str, init: str, seed: int) -> str:
    """The Stage-A cell that trains ``dataset`` from ``init`` with ``seed``: what transfer and distill read."""
    return f"A-{dataset}-{init}-s{seed}"


def pretrain_dir(dataset: str, init: str, seed: int) -> str:
    """That cell's run directory, as a cell argument (filled in by ``fill_run_root``)."""
    return f"{{run_root}}/cells/pretrain/{pretrain_id(dataset, init, seed)}"


def expand(spec: Spec) -> dict[str, list[Cell]]:
    """Every cell of the spec, by stage, in stage order."""
    store = str(Path(spec.store).absolute())
    out: dict[str, list[Cell]] = {}
    if "standardize" in spec.stages:
        out["standardize"] = standardize_cells(spec, store)
    if "pretrain" in spec.stages:
        out["pretrain"] = pretrain_cells(spec, store)
    if "transfer" in spec.stages:
        out["transfer"] = transfer_cells(spec, store)
    if "distill" in spec.stages:
        out["merge"], out["distill"] = distill_cells(spec, store)
    out["collect"] = [Cell("collect", "collect", "collect", {})]  # every sweep ends with its collector
    read_stores(out)
    for cell in (c for cells in out.values() for c in cells if c.kind == "train"):
        if spec.protocol != protocol.DEFAULT:  # the paper's optimizer, precision and validation defaults
            cell.args["protocol"] = spec.protocol
        if spec.stage_to is not None:  # where a node stages the data: an argument of the run, not in the id
            cell.args["stage_to"] = spec.stage_to
    return {s: out[s] for s in STAGES if s in out}


def read_stores(cells: dict[str, list[Cell]]) -> None:
    """A training cell reads its dataset from the store: the done markers of that dataset's standardize cells
    come first among its inputs, so a cell whose store failed is blocked by the cell that failed, like one
    whose model failed (a spec without a standardize stage reads a store made before)."""
    markers: dict[str, list[str]] = {}
    for c in cells.get("standardize", []):
        markers.setdefault(c.args["name"], []).append(f"{{run_root}}/cells/standardize/{c.id}/done.json")
    for members in cells.values():
        for cell in members:
            if cell.kind == "train":
                cell.inputs = [*markers.get(cell.args["dataset"], []), *cell.inputs]


def target_lrs(spec: Spec, stage: Stage, target: str) -> list[float]:
    """The LRs a stage tunes ``target`` with: its list, or the paper's LR for the target's card."""
    if isinstance(stage.lrs, str):  # "per-target": the only string spec.parse lets through
        return [protocol.TARGET_LR.get(spec.datasets[target].card, 1e-4)]
    return list(stage.lrs)


def trial_sources(spec: Spec, stage: Stage) -> str:
    """Where a stage's trials start: "matched" (seed s from source seed s) or "first" (all from one source)."""
    return stage.trial_sources or ("first" if spec.protocol == "paper" else "matched")


def low_contrast_filter(spec: Spec, d: Dataset) -> bool:
    """Whether a dataset's blank patches are dropped: the spec's choice, else the protocol's (the paper did not
    reprocess ADP, so its released patches never passed the filter)."""
    if d.filter is not None:
        return d.filter
    return not (spec.protocol == "paper" and d.card in protocol.UNFILTERED)


def split_rule(spec: Spec, d: Dataset) -> str:
    """How a dataset is split: the spec's rule, else the protocol's (paper: patch-level, after tiling)."""
    return d.split_rule or (protocol.SPLIT_RULE if spec.protocol == "paper" else "grouped")


def standardize_cells(spec: Spec, store: str) -> list[Cell]:
    """One cell per shard of every dataset."""
    return [standardize_cell(spec, store, d, i) for d in spec.datasets.values() for i in range(d.shards)]


def standardize_cell(spec: Spec, store: str, d: Dataset, shard: int) -> Cell:
    args = {
        "dataset": d.card,
        "raw": str(Path(d.raw).absolute()),
        "store": store,
        "name": d.name,
        "mpp": d.mpp,
        "shard": f"{shard}/{d.shards}",
        "patch_size": spec.patch_size,
        "target_mpp": spec.target_mpp,
        "option": [f"{k}={v}" for k, v in protocol.card_options(spec.protocol, d.card, d.options).items()],
        "max_per_class": d.max_per_class,
        "progress": False,
    }
    if not low_contrast_filter(spec, d):  # only where not the defaults: the cells of studies planned before stay equal
        args["filter"] = False
    rule = split_rule(spec, d)
    if rule != "grouped":
        args["split_rule"] = rule
    if d.split_seed:
        args["split_seed"] = d.split_seed
    return Cell("standardize", f"std-{d.name}-{shard}of{d.shards}", "standardize", args)


def pretrain_cells(spec: Spec, store: str) -> list[Cell]:
    """Stage A: every source trained from every init with every seed."""
    st = spec.stages["pretrain"]
    return [pretrain_cell(st, store, *key) for key in product(st.datasets, st.inits, st.seeds)]


def pretrain_cell(st: Stage, store: str, name: str, init: str, seed: int) -> Cell:
    return Cell(
        "pretrain",
        pretrain_id(name, init, seed),
        "train",
        {
            "keep": KEEP["pretrain"],
            **st.recipe,
            "store": store,
            "dataset": name,
            "init": init,
            "mode": "scratch",
            "seed": seed,
            "norm": "imagenet" if init == "imagenet" else "dataset",
        },
        meta={
            "family": init,
            "source": name,
            "target": name,
            "mode": "scratch",
            "lr": st.recipe.get("lr"),
            "seed": seed,
        },
    )


def transfer_cells(spec: Spec, store: str) -> list[Cell]:
    """Stage B: every pretrained source tuned on every target, in every mode, LR and seed."""
    st = spec.stages["transfer"]
    sources = st.sources or spec.stages["pretrain"].datasets
    targets = st.targets or list(spec.datasets)
    pairs = [(s, t) for s, t in product(sources, targets) if s != t or st.include_diagonal]
    first = spec.stages["pretrain"].seeds[0] if trial_sources(spec, st) == "first" else None
    return [
        transfer_cell(st, store, init, source, target, mode, lr, seed, first)
        for init in st.inits
        for source, target in pairs
        for mode, lr, seed in product(st.modes, target_lrs(spec, st, target), st.seeds)
    ]


def transfer_cell(
    st: Stage, store: str, init: str, source: str, target: str, mode: str, lr: float, seed: int, source_seed=None
) -> Cell:
    """One transfer; its source model is Stage A's of ``source_seed`` (None: the same seed)."""
    source_seed = seed if source_seed is None else source_seed
    init_path = f"{pretrain_dir(source, init, source_seed)}/best.pt"
    return Cell(
        "transfer",
        f"B-{init}-{source}-{target}-{mode}-lr{lr_name(lr)}-s{seed}",
        "train",
        {
            "keep": KEEP["transfer"],
            **st.recipe,
            "store": store,
            "dataset": target,
            "init": init_path,
            "mode": mode,
            "lr": lr,
            "seed": seed,
            "norm": "imagenet" if init == "imagenet" else source,
        },
        inputs=[init_path],
        meta={
            "family": init,
            "source": source,
            "target": target,
            "mode": mode,
            "lr": lr,
            "seed": seed,
            **({"source_seed": source_seed} if source_seed != seed else {}),
        },
    )


@dataclass(frozen=True)
class Merge:
    """One merged model of weight distillation: Stage-A models of one family and seed, one rule."""

    init: str
    members: tuple[str, ...]
    rule: str
    lowrank: bool
    seed: int

    @property
    def name(self) -> str:
        return f"{self.init}-{'+'.join(self.members)}-{self.rule}{'-lowrank' if self.lowrank else ''}"

    @property
    def id(self) -> str:
        return f"M-{self.name}-s{self.seed}"


def distill_cells(spec: Spec, store: str) -> tuple[list[Cell], list[Cell]]:
    """Weight distillation: merge cells (no training) and the deep-tuning of each merged model on each target.

    HistoKT merged Stage-A models of one family (random or ImageNet init) and deep-tuned the result with the
    Stage-B recipe over the LR grid; normalization: the target's own statistics (random family) or ImageNet's.
    """
    from histokt.distill.evbmf import DEFAULT_SEARCH  # numpy: loaded only where a study distills

    st = spec.stages["distill"]
    # "first" (the paper): one merged model per rule, from the first seed's Stage-A models, tuned with every seed
    first = trial_sources(spec, st) == "first"
    merge_seeds = st.seeds[:1] if first else st.seeds
    merges = [
        Merge(init, tuple(members), rule, lowrank, seed)
        for init, members, rule, lowrank, seed in product(st.inits, st.source_sets, st.rules, st.lowrank, merge_seeds)
    ]
    tunes = [
        tune_cell(st, store, m, target, lr, seed)
        for m in merges
        for target in st.targets
        for lr in target_lrs(spec, st, target)
        for seed in (st.seeds if first else [m.seed])
    ]
    merge_cells = [merge_cell(m) for m in merges]
    for cell in merge_cells:  # named in every merge cell: one planned before it ran the reference search
        cell.args["evbmf_search"] = st.evbmf_search or DEFAULT_SEARCH
    return merge_cells, tunes


def merge_cell(m: Merge) -> Cell:
    sources = [pretrain_dir(member, m.init, m.seed) for member in m.members]
    return Cell(
        "merge",
        m.id,
        "merge",
        {"sources": sources, "rule": m.rule, "lowrank": m.lowrank},
        inputs=[f"{s}/best.pt" for s in sources],
    )


def tune_cell(st: Stage, store: str, m: Merge, target: str, lr: float, seed: int) -> Cell:
    """Trial ``seed`` of deep-tuning merged model ``m`` on ``target``."""
    merged = f"{{run_root}}/cells/merge/{m.id}/merged.pt"
    return Cell(
        "distill",
        f"D-{m.name}-{target}-lr{lr_name(lr)}-s{seed}",
        "train",
        {
            "keep": KEEP["distill"],
            **st.recipe,
            "store": store,
            "dataset": target,
            "init": merged,
            "mode": "deep",
            "lr": lr,
            "seed": seed,
            "norm": "imagenet" if m.init == "imagenet" else "dataset",
        },
        inputs=[merged],
        meta={
            "family": m.init,
            "source": "+".join(m.members),
            "target": target,
            "mode": "deep",
            "lr": lr,
            "seed": seed,
            "rule": m.rule,
            "lowrank": m.lowrank,
            **({"source_seed": m.seed} if m.seed != seed else {}),
        },
    )


def deviations(spec: Spec) -> list[protocol.Deviation]:
    """How the study's plan differs from the paper's (plan.json records them; each cell's result.json lists
    its own): the transfer LRs, where trials start, and what no protocol removes."""
    transfer = spec.stages.get("transfer")  # (the paper tuned its merged models over the grid: distill's may)
    fixed_lrs = transfer is None or isinstance(transfer.lrs, str)
    tuned = [spec.stages[s] for s in ("transfer", "distill") if s in spec.stages]
    sources = "first" if all(trial_sources(spec, st) == "first" for st in tuned) else "matched"
    trained = [spec.stages[s] for s in ("pretrain", "transfer", "distill") if s in spec.stages]
    trials = min((len(st.seeds) for st in trained), default=protocol.TRIALS)
    return protocol.study_deviations(fixed_lrs, sources, merges="distill" in spec.stages, trials=trials)


def cell_dir(run_root, cell: Cell) -> Path:
    return Path(run_root) / "cells" / cell.stage / cell.id


def fill_run_root(value, run_root):
    """Cell arguments may name files under the run root as '{run_root}/...'."""
    if isinstance(value, str):
        return value.replace("{run_root}", str(Path(run_root).absolute()))
    if isinstance(value, list):
        return [fill_run_root(v, run_root) for v in value]
    return value


def marker(run_root, cell: Cell) -> Path:
    """The file whose existence means the cell is done."""
    return cell_dir(run_root, cell) / ("result.json" if cell.kind == "train" else "done.json")


def is_done(run_root, cell: Cell) -> bool:
    return marker(run_root, cell).is_file()


def write(run_root, spec: Spec, plan: dict[str, list[Cell]], force: bool = False) -> None:
    """Write RUN_ROOT/spec.toml and plan.json; a run root made from another spec is refused unless force."""
    root = Path(run_root)
    old = atomic.read_json(root / "plan.json")
    if old is not None and old.get("spec_digest") != spec.digest and not force:
        raise UserError(
            f"{root}: was made from another spec (digest {old.get('spec_digest')}, this one "
            f"{spec.digest}); use another run_root, or --force to re-plan it"
        )
    root.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(root / "spec.toml", spec.text.encode())
    doc = {
        "format": PLAN_FORMAT,
        "study": spec.name,
        "spec_digest": spec.digest,
        "store": spec.store,
        "protocol": spec.protocol,
        "deviations": [d.to_json() for d in deviations(spec)],
        "stages": {stage: [asdict(c) for c in cells] for stage, cells in plan.items()},
    }
    atomic.write_bytes(root / "plan.json", json.dumps(doc, separators=(",", ":")).encode())


def read(run_root) -> dict[str, list[Cell]]:
    return cells_of(read_doc(run_root))


def read_doc(run_root) -> dict:
    """plan.json as written (study, protocol, deviations, stages); a UserError where there is none."""
    doc = atomic.read_json(Path(run_root) / "plan.json")
    if doc is None:
        raise UserError(f"{run_root}: no plan.json here; run 'histokt sweep SPEC' first")
    return doc


def cells_of(doc: dict) -> dict[str, list[Cell]]:
    """The cells of a plan.json document, by stage."""
    return {stage: [Cell(**c) for c in cells] for stage, cells in doc["stages"].items()}
