"""The paper study's whole plan on the local SLURM cluster, rehearsed: waves, dependencies and failures at size.

    bash slurm/local/start.sh
    .venv/bin/python benchmarks/rehearse.py [--spec jobs/paper.toml] [--max-queued 200] [--watch-interval 30]
                                            [--missing glas] [--fail A-adp-imagenet-s0] [--work DIR] [--pool N]

``histokt sweep SPEC --executor slurm --rehearse --max-queued N --watch``, one command, over a copy of the spec
whose resources fit the local node (1 CPU, 256 MB, no GPU: the plan, its cells and their inputs are
unchanged) and whose raw folders are empty folders in the work directory, but one (``--missing``): that
dataset's standardize cells fail as they would for real, and ``--fail`` plants the failure of more cells.

Counted and checked, never asserted in CI (it takes the better part of an hour here):
- the wall time of the one command, and every call it made to squeue, sbatch, scancel and scontrol (counting
  stand-ins on PATH in front of the real tools);
- the study's tasks queued or running, sampled from squeue every 2 s, and from the submission ledger
  (``queued_before`` + the array's cells), against the budget;
- every cell's end (done marker, or state.json's failed / blocked) against what the plan implies: a cell is
  expected to fail where planted (or its raw folder is absent), to be blocked where a cell it reads from
  failed or is blocked, and to be done otherwise.

With ``--pool N`` the same study runs as a pool of N workers per kind of resource (``sweep --pool``): the
two ways compared (README "Benchmarks").

Writes benchmarks/results/rehearse.json (rehearse-pool<N>.json with --pool).
"""

import argparse
import getpass
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import machine_info, markdown_table, write_results  # noqa: E402

TOOLS = ("squeue", "sbatch", "scancel", "scontrol", "sacctmgr")


def rehearsal_spec(spec: Path, work: Path, missing: str) -> Path:
    """The spec with its paths in ``work`` and resources that fit one small node; the plan is the same."""
    text = spec.read_text()
    text = re.sub(r'^store = ".*"$', f'store = "{work}/store.zarr"', text, flags=re.M)
    text = re.sub(r'^run_root = ".*"$', f'run_root = "{work}/runs"', text, flags=re.M)
    text = re.sub(r"^gpus = \d+$", "gpus = 0", text, flags=re.M)
    text = re.sub(r"^cpus = \d+$", "cpus = 1", text, flags=re.M)
    text = re.sub(r"^mem_gb = [\d.]+$", "mem_gb = 0.25", text, flags=re.M)
    out = []
    for block in re.split(r"(?m)^(?=\[)", text):
        m = re.match(r"\[datasets\.(\w+)\]", block)
        if m:
            raw = work / "raw" / m.group(1)
            if m.group(1) != missing:
                raw.mkdir(parents=True, exist_ok=True)
            block = re.sub(r'^raw = ".*"$', f'raw = "{raw}"', block, flags=re.M)
        out.append(block)
    path = work / "rehearsal.toml"
    path.write_text("".join(out))
    return path


def counting_tools(work: Path) -> tuple[Path, Path]:
    """Stand-ins for the SLURM client tools that log each call and run the real one."""
    bin_dir, log = work / "bin", work / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    for tool in TOOLS:
        real = shutil.which(tool)
        if real is None:
            continue
        stand_in = bin_dir / tool
        stand_in.write_text(f'#!/bin/sh\necho "{tool} $1" >> {log}\nexec {real} "$@"\n')
        stand_in.chmod(0o755)
    return bin_dir, log


def expected_ends(run_root: Path, missing: str, planted: list[str]) -> dict[str, str]:
    """What each cell should end as, from the plan alone: failed (planted, or the raw folder is absent),
    blocked (a cell it reads from failed or is blocked), else done."""
    from histokt.study import plan

    cells = plan.read(run_root)
    writer = {d: c.id for d, c in plan.writers(run_root, cells).items()}
    ends: dict[str, str] = {}
    for stage, members in cells.items():
        for c in members:
            reads = {writer.get(Path(p).parent) for p in plan.fill_run_root(c.inputs, run_root)} - {None}
            if stage == "collect":
                ends[c.id] = "done"
            elif any(ends[r] in ("failed", "blocked") for r in reads):
                ends[c.id] = "blocked"
            elif (c.kind == "standardize" and c.args["name"] == missing) or any(fnmatch(c.id, g) for g in planted):
                ends[c.id] = "failed"
            else:
                ends[c.id] = "done"
    return ends


def actual_ends(run_root: Path) -> dict[str, str]:
    from histokt import atomic
    from histokt.study import plan

    out = {}
    for members in plan.read(run_root).values():
        for c in members:
            state = atomic.read_json(plan.cell_dir(run_root, c) / "state.json") or {}
            out[c.id] = "done" if plan.is_done(run_root, c) else state.get("status", "never ran")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", type=Path, default=ROOT / "jobs" / "paper.toml")
    ap.add_argument("--max-queued", type=int, default=200)
    ap.add_argument("--watch-interval", type=float, default=30.0)
    ap.add_argument("--missing", default="glas", help="the dataset whose raw folder is absent")
    ap.add_argument("--fail", default="A-adp-imagenet-s0", help="comma-separated globs of cells that fail")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "histokt-rehearsal")
    ap.add_argument("--pool", type=int, default=0, help="workers per pool (0: one task per cell)")
    args = ap.parse_args()
    if subprocess.run(["squeue", "-h"], capture_output=True).returncode != 0:
        print("rehearse: no SLURM controller answers; start the local cluster: bash slurm/local/start.sh")
        return 2
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    spec = rehearsal_spec(args.spec, args.work, args.missing)
    bin_dir, log = counting_tools(args.work)
    run_root = args.work / "runs"
    seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        from histokt.batch.slurm import job_of, submissions

        while not stop.is_set():
            if (run_root / "submissions.jsonl").exists():
                jobs = {r["job"] for r in submissions(run_root)}
                listed = subprocess.run(
                    ["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i"], capture_output=True, text=True
                ).stdout.split()
                seen.append(sum(job_of(t) in jobs for t in listed))
            stop.wait(2)

    sampler = threading.Thread(target=sample, daemon=True)
    command = [
        *(sys.executable, "-m", "histokt", "sweep", str(spec), "--executor", "slurm", "--rehearse"),
        *("--run-root", str(run_root), "--max-queued", str(args.max_queued), "--watch"),
        *("--watch-interval", str(args.watch_interval), "--rehearse-fail", args.fail),
        *("--pool", str(args.pool)),  # 0: one task per cell, whatever the spec says
    ]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    sampler.start()
    t0 = time.perf_counter()
    with open(args.work / "sweep.log", "w") as out:
        code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()

    from histokt.batch.slurm import submissions

    calls: dict[str, int] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        name = line.split()[0] if line.split()[1:2] != ["requeue"] else "scontrol requeue"
        calls[name] = calls.get(name, 0) + 1
    records = submissions(run_root)
    ledger_peak = max(r["queued_before"] + r.get("workers", len(r["cells"])) for r in records)
    # one wave per pass of the watcher: its submissions come within seconds, passes are an interval apart
    waves = sum(1 for a, b in zip([None, *records], records) if a is None or b["time"] - a["time"] > 5)
    expected, actual = expected_ends(run_root, args.missing, args.fail.split(",")), actual_ends(run_root)
    wrong = {c: (expected[c], actual[c]) for c in expected if expected[c] != actual[c]}
    by_end: dict[str, dict[str, int]] = {}
    from histokt.study import plan

    for stage, members in plan.read(run_root).items():
        for c in members:
            row = by_end.setdefault(stage, {"done": 0, "failed": 0, "blocked": 0, "other": 0})
            row[actual[c.id] if actual[c.id] in row else "other"] += 1
    result = {
        "machine": machine_info(),
        "spec": str(args.spec.relative_to(ROOT) if args.spec.is_relative_to(ROOT) else args.spec),
        "cells": len(actual),
        "max_queued": args.max_queued,
        "watch_interval_s": args.watch_interval,
        "missing": args.missing,
        "fail": args.fail,
        "pool": args.pool,
        "exit_code": code,
        "wall_s": round(wall, 1),
        "scheduler_calls": calls,
        "submissions": len(records),
        "waves_about": waves,
        "peak_queued_sampled": max(seen, default=0),
        "peak_queued_ledger": ledger_peak,
        "ends": by_end,
        "unexpected": len(wrong),
    }
    path = write_results(f"rehearse-pool{args.pool}" if args.pool else "rehearse", result)
    rows = [[s, *e.values()] for s, e in by_end.items()]
    print(markdown_table(["stage", "done", "failed", "blocked", "other"], rows))
    print(
        f"\n{len(actual)} cells in {wall / 60:.1f} min (exit {code}); {len(records)} sbatch submissions; calls "
        f"{calls}; peak queued {max(seen, default=0)} sampled, {ledger_peak} by the ledger (budget "
        f"{args.max_queued}); {len(wrong)} cells ended otherwise than the plan implies"
    )
    for cell, (want, got) in sorted(wrong.items())[:20]:
        print(f"  {cell}: expected {want}, got {got}")
    print(f"wrote {path}")
    return 0 if not wrong and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
