"""Collector benchmark: a generated run root of the paper's shape plus distillation cells (5,094 training cells,
random results, a few missing, failed and corrupt) collected with every output, --compare-paper included.
Times ``collect`` in this process (best of --repeat) and in a fresh interpreter (imports included).

    .venv/bin/python benchmarks/collect.py [--work DIR] [--repeat 3]

Goal (the issue): thousands of cells collected in under 5 s.
"""

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from _common import DEFAULT_WORK, machine_info, markdown_table, write_results  # noqa: E402

from histokt.results.paper import CARDS  # noqa: E402
from histokt.study import plan  # noqa: E402
from histokt.train.config import TrainConfig, config_dict  # noqa: E402

FAMILIES = ("random", "imagenet")
MODES = ("fine", "deep")
LRS = (1e-3, 5e-4, 2e-4, 1e-4, 5e-5)  # the paper's grid
SEEDS = (0, 1, 2)
DISTILL = {
    "targets": ("bach", "mhist"),
    "sources": ("adp+bcss", "adp+crc+os+bcss"),
    "rules": ("maxkg", "average", "kappa"),
    "lowrank": (False, True),
}


def cells(seeds=SEEDS) -> dict[str, list[plan.Cell]]:
    out = {"pretrain": [], "transfer": [], "distill": []}
    for d in CARDS:
        for fam in FAMILIES:
            for seed in seeds:
                out["pretrain"].append(
                    plan.Cell(
                        "pretrain",
                        f"A-{d}-{fam}-s{seed}",
                        "train",
                        {"dataset": d},
                        meta={"family": fam, "source": d, "target": d, "mode": "scratch", "lr": 0.03, "seed": seed},
                    )
                )
    for fam in FAMILIES:
        for s in CARDS:
            for t in CARDS:
                if s == t:
                    continue
                for mode in MODES:
                    for lr in LRS:
                        for seed in seeds:
                            out["transfer"].append(
                                plan.Cell(
                                    "transfer",
                                    f"B-{fam}-{s}-{t}-{mode}-lr{plan.lr_name(lr)}-s{seed}",
                                    "train",
                                    {"dataset": t, "lr": lr},
                                    meta={
                                        "family": fam,
                                        "source": s,
                                        "target": t,
                                        "mode": mode,
                                        "lr": lr,
                                        "seed": seed,
                                    },
                                )
                            )
    for fam in FAMILIES:
        for t in DISTILL["targets"]:
            for src in DISTILL["sources"]:
                for rule in DISTILL["rules"]:
                    for low in DISTILL["lowrank"]:
                        for lr in LRS:
                            for seed in seeds:
                                out["distill"].append(
                                    plan.Cell(
                                        "distill",
                                        f"D-{fam}-{src}-{t}-{rule}-{'svd' if low else 'raw'}"
                                        f"-lr{plan.lr_name(lr)}-s{seed}",
                                        "train",
                                        {"dataset": t, "lr": lr},
                                        meta={
                                            "family": fam,
                                            "source": src,
                                            "target": t,
                                            "mode": "deep",
                                            "lr": lr,
                                            "seed": seed,
                                            "rule": rule,
                                            "lowrank": low,
                                        },
                                    )
                                )
    out["collect"] = [plan.Cell("collect", "collect", "collect", {})]
    return out


def generate(run_root: Path, seed: int = 0, seeds=SEEDS) -> dict:
    """Write plan.json and, for ~97 % of the cells, a result.json shaped like histokt train's (about 2 KB)."""
    rng = random.Random(seed)
    stages = cells(seeds)
    shutil.rmtree(run_root, ignore_errors=True)
    run_root.mkdir(parents=True)
    doc = {
        "format": plan.PLAN_FORMAT,
        "study": "bench-collect",
        "spec_digest": "bench",
        "store": "store.zarr",
        "stages": {s: [asdict(c) for c in cs] for s, cs in stages.items()},
    }
    (run_root / "plan.json").write_text(json.dumps(doc, separators=(",", ":")))
    config = config_dict(TrainConfig(store="store.zarr", dataset="x", out="out"))
    counts = {"done": 0, "missing": 0, "failed": 0, "corrupt": 0}
    for cell in (c for s, cs in stages.items() if s != "collect" for c in cs):
        directory = plan.cell_dir(run_root, cell)
        directory.mkdir(parents=True)
        u = rng.random()
        if u < 0.02:
            counts["missing"] += 1
            continue
        if u < 0.025:
            counts["failed"] += 1
            (directory / "state.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError: boom"}))
            continue
        if u < 0.03:
            counts["corrupt"] += 1
            (directory / "result.json").write_text('{"config": {"lr": 0.0')
            continue
        counts["done"] += 1
        base = 0.7 + 0.25 * rng.random()
        per_class = [min(1.0, max(0.0, base + rng.gauss(0, 0.05))) for _ in range(8)]
        result = {
            "config": {**config, "dataset": cell.meta["target"], "lr": cell.meta["lr"]},
            "classes": [f"class_{i}" for i in range(8)],
            "valid": {"top1_best": base + rng.gauss(0, 0.01), "best_epoch": rng.randrange(250)},
            "test": {
                "top1": base + rng.gauss(0, 0.01),
                "balanced_acc": base,
                "per_class_acc": per_class,
                "n": 1000,
                "loss": rng.random(),
            },
            "epochs": 250,
            "steps": 100000,
            "world_size": 1,
            "seconds": 3600.0,
            "histokt_version": "0.1.0",
        }
        (directory / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        (directory / "state.json").write_text(json.dumps({"status": "done", "attempts": 1}))
    return {"cells": sum(len(cs) for s, cs in stages.items() if s != "collect"), **counts}


CHILD = """
import sys, time
t = time.perf_counter()
from histokt.results.collect import collect
s = collect(sys.argv[1], out=sys.argv[2], compare_paper=True)
print(time.perf_counter() - t)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK / "collect")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3, help="trials per cell: 3 -> 5,094 training cells, 1 -> 1,698")
    ap.add_argument("--out", default="collect", help="results file name: benchmarks/results/OUT.json")
    args = ap.parse_args()
    from histokt.results.collect import collect

    run_root = args.work / f"runs-{args.seeds}"
    t = time.perf_counter()
    made = generate(run_root, seeds=tuple(range(args.seeds)))
    gen_s = time.perf_counter() - t
    times, summary = [], None
    for i in range(args.repeat):
        t = time.perf_counter()
        summary = collect(run_root, out=args.work / f"summary-{i}", compare_paper=True)
        times.append(time.perf_counter() - t)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(run_root), str(args.work / "summary-fresh")],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT)},
    )
    fresh_inside = float(child.stdout.split()[-1])
    t = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "histokt",
            "collect",
            str(run_root),
            "--out",
            str(args.work / "summary-cli"),
            "--compare-paper",
        ],
        capture_output=True,
        check=True,
        env={"PYTHONPATH": str(ROOT)},
    )
    cli_s = time.perf_counter() - t
    result = {
        "cells": made["cells"],
        "generated": made,
        "generate_s": gen_s,
        "collect_s": times,
        "collect_best_s": min(times),
        "fresh_process_collect_s": fresh_inside,
        "cli_process_s": cli_s,
        "collected": {k: summary[k] for k in ("done", "missing", "failed", "corrupt", "running", "rows")},
        "files": len(summary["files"]),
        "matrices": len(summary["matrices"]),
        "machine": machine_info(),
        "goal_s": 5.0,
    }
    rows = [
        ["training cells in the run root", made["cells"]],
        [
            "done / not started / failed / corrupt",
            f"{summary['done']} / {summary['missing']} / {summary['failed']} / {summary['corrupt']}",
        ],
        ["files written (4 matrices × csv/md/tex/png, compare, distill, report)", len(summary["files"])],
        [f"collect(), warm, best of {args.repeat}, s", min(times)],
        ["collect() in a fresh interpreter (imports included), s", fresh_inside],
        ["`histokt collect --compare-paper` whole process, s", cli_s],
        ["goal, s", 5.0],
    ]
    print(markdown_table(["measure", "value"], rows))
    print(f"\nwritten to {write_results(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
