"""A spec expanded into cells: one unit of work each, with a stable id and its own run directory.

    RUN_ROOT/spec.toml, RUN_ROOT/plan.json
    RUN_ROOT/cells/<stage>/<cell id>/     the cell's run directory (a train cell's is issue 2's contract)

Ids are built from what the cell computes (stage, dataset, init, mode, lr, seed), so the same spec gives the
same ids, and a cell's directory survives re-planning.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from histokt import atomic
from histokt.errors import UserError
from histokt.study.spec import STAGES, Spec

PLAN_FORMAT = "histokt-plan/1"


@dataclass
class Cell:
    stage: str
    id: str
    kind: str  # standardize | train | collect
    args: dict = field(default_factory=dict)  # the command's config fields
    inputs: list = field(default_factory=list)  # files that must exist before it can run
    meta: dict = field(default_factory=dict)  # what the collector groups by: family, source, target, mode, lr, seed


def lr_name(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def expand(spec: Spec) -> dict[str, list[Cell]]:
    """Every cell of the spec, by stage, in stage order."""
    from histokt.train.recipes import TARGET_LR

    store = str(Path(spec.store).absolute())
    out: dict[str, list[Cell]] = {}
    if "standardize" in spec.stages:
        cells = []
        for name, d in spec.datasets.items():
            for i in range(d.shards):
                args = {
                    "dataset": d.card,
                    "raw": str(Path(d.raw).absolute()),
                    "store": store,
                    "name": name,
                    "mpp": d.mpp,
                    "shard": f"{i}/{d.shards}",
                    "patch_size": spec.patch_size,
                    "target_mpp": spec.target_mpp,
                    "option": [f"{k}={v}" for k, v in d.options.items()],
                    "max_per_class": d.max_per_class,
                    "progress": False,
                }
                cells.append(Cell("standardize", f"std-{name}-{i}of{d.shards}", "standardize", args))
        out["standardize"] = cells
    if "pretrain" in spec.stages:
        st = spec.stages["pretrain"]
        out["pretrain"] = [
            Cell(
                "pretrain",
                f"A-{name}-{init}-s{seed}",
                "train",
                {
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
            for name in st.datasets
            for init in st.inits
            for seed in st.seeds
        ]
    if "transfer" in spec.stages:
        st = spec.stages["transfer"]
        sources = st.sources or spec.stages["pretrain"].datasets
        targets = st.targets or list(spec.datasets)
        cells = []
        for init in st.inits:
            for source in sources:
                for target in targets:
                    if source == target and not st.include_diagonal:
                        continue
                    lrs = [TARGET_LR.get(spec.datasets[target].card, 1e-4)] if st.lrs == "per-target" else st.lrs
                    for mode in st.modes:
                        for lr in lrs:
                            for seed in st.seeds:
                                src = f"A-{source}-{init}-s{seed}"
                                init_path = f"{{run_root}}/cells/pretrain/{src}/best.pt"
                                cells.append(
                                    Cell(
                                        "transfer",
                                        f"B-{init}-{source}-{target}-{mode}-lr{lr_name(lr)}-s{seed}",
                                        "train",
                                        {
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
                                        },
                                    )
                                )
        out["transfer"] = cells
    if "distill" in spec.stages:
        out["merge"], out["distill"] = distill_cells(spec, store)
    out["collect"] = [Cell("collect", "collect", "collect", {})]  # every sweep ends with its collector
    return {s: out[s] for s in STAGES if s in out}


def distill_cells(spec: Spec, store: str) -> tuple[list[Cell], list[Cell]]:
    """Weight distillation: merge cells (no training) and the deep-tuning of each merged model on each target.

    HistoKT merged Stage-A models of one family (random or ImageNet init) and deep-tuned the result with the
    Stage-B recipe over the LR grid; normalization: the target's own statistics (random family) or ImageNet's.
    """
    from histokt.train.recipes import TARGET_LR

    st = spec.stages["distill"]
    merges, tunes = [], []
    for init in st.inits:
        for members in st.source_sets:
            for rule in st.rules:
                for lowrank in st.lowrank:
                    for seed in st.seeds:
                        name = f"{init}-{'+'.join(members)}-{rule}{'-lowrank' if lowrank else ''}"
                        sources = [f"{{run_root}}/cells/pretrain/A-{m}-{init}-s{seed}" for m in members]
                        merge = Cell(
                            "merge",
                            f"M-{name}-s{seed}",
                            "merge",
                            {"sources": sources, "rule": rule, "lowrank": lowrank},
                            inputs=[f"{s}/best.pt" for s in sources],
                        )
                        merges.append(merge)
                        merged = f"{{run_root}}/cells/merge/{merge.id}/merged.pt"
                        for target in st.targets:
                            lrs = (
                                [TARGET_LR.get(spec.datasets[target].card, 1e-4)] if st.lrs == "per-target" else st.lrs
                            )
                            for lr in lrs:
                                tunes.append(
                                    Cell(
                                        "distill",
                                        f"D-{name}-{target}-lr{lr_name(lr)}-s{seed}",
                                        "train",
                                        {
                                            **st.recipe,
                                            "store": store,
                                            "dataset": target,
                                            "init": merged,
                                            "mode": "deep",
                                            "lr": lr,
                                            "seed": seed,
                                            "norm": "imagenet" if init == "imagenet" else "dataset",
                                        },
                                        inputs=[merged],
                                        meta={
                                            "family": init,
                                            "source": "+".join(members),
                                            "target": target,
                                            "mode": "deep",
                                            "lr": lr,
                                            "seed": seed,
                                            "rule": rule,
                                            "lowrank": lowrank,
                                        },
                                    )
                                )
    return merges, tunes


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
        "stages": {stage: [asdict(c) for c in cells] for stage, cells in plan.items()},
    }
    atomic.write_bytes(root / "plan.json", json.dumps(doc, separators=(",", ":")).encode())


def read(run_root) -> dict[str, list[Cell]]:
    doc = atomic.read_json(Path(run_root) / "plan.json")
    if doc is None:
        raise UserError(f"{run_root}: no plan.json here; run 'histokt sweep SPEC' first")
    return {stage: [Cell(**c) for c in cells] for stage, cells in doc["stages"].items()}
