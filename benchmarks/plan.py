"""Planning benchmark: a spec expanded, written to plan.json, and every stage's sbatch script rendered
(--dry-run: the arrays, the cost table and the pools), in a fresh interpreter: wall time and peak memory, for
jobs/demo.toml (39 cells) and jobs/paper.toml (4,675 cells), to show how the cost grows with the study.

    .venv/bin/python benchmarks/plan.py
"""

import json
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import resource, sys, time
t = time.perf_counter()
from histokt.batch.sweep import SweepConfig, sweep
from histokt.study import plan
from histokt.study.spec import load
spec = load(sys.argv[1])
cells = plan.expand(spec)
plan.write("runs/paper", spec, cells)
out = sweep(SweepConfig(spec=sys.argv[1], executor="slurm", dry_run=True, progress=False))
print(sum(len(c) for c in cells.values()), time.perf_counter() - t,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def measure(spec: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        for d in tomllib.loads(spec.read_text())["datasets"].values():
            (Path(tmp) / d["raw"]).mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(spec)],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONPATH": str(ROOT)},
        )
        wall = time.perf_counter() - t
        plan_bytes = (Path(tmp) / "runs" / "paper" / "plan.json").stat().st_size
    cells, inside, rss = out.stdout.split()
    return {
        "spec": spec.name,
        "cells": int(cells),
        "process_wall_s": wall,
        "plan_and_dry_run_s": float(inside),
        "peak_rss_mb": float(rss),
        "plan_json_mb": plan_bytes / 2**20,
    }


def main() -> int:
    runs = [measure(ROOT / "jobs" / name) for name in ("demo.toml", "paper.toml")]
    print("| spec | cells | plan + plan.json + sbatch scripts, s | whole process, s | peak RSS, MB | plan.json, MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in runs:
        print(
            f"| {r['spec']} | {r['cells']:,} | {r['plan_and_dry_run_s']:.2f} | {r['process_wall_s']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {r['plan_json_mb']:.2f} |"
        )
    path = ROOT / "benchmarks" / "results" / "plan.json"
    path.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "runs": runs, **runs[-1]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
