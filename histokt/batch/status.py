"""`histokt status RUN_ROOT`: where a study stands, from the run root and squeue (never sacct)."""

from pathlib import Path

from histokt import atomic
from histokt.batch import slurm
from histokt.study import plan

COLUMNS = ("done", "running", "pending", "requeued", "failed")


def cell_status(run_root: Path, cell: plan.Cell, queue: dict | None, jobs: dict, state: dict) -> tuple[str, str | None]:
    """(status, last error line) of one cell; ``state`` is its state.json (or {})."""
    if plan.is_done(run_root, cell):
        return "done", None
    task = jobs.get(cell.id)
    in_queue = queue.get(task) if queue and task else None
    if in_queue == "RUNNING":
        return "running", None
    if state.get("status") == "failed" and not in_queue:
        return "failed", state.get("error")
    if state.get("status") == "interrupted":
        return "requeued", None
    if state.get("status") == "running" and queue is None:
        return "running", None  # no scheduler to ask (local runs): trust the cell's own word
    return "pending", None


def status(run_root) -> dict:
    run_root = Path(run_root)
    cells = plan.read(run_root)
    queue, jobs = slurm.squeue(), slurm.cell_jobs(run_root)
    table, failures, preempted = {}, [], []
    for stage, members in cells.items():
        counts = dict.fromkeys(COLUMNS, 0)
        for cell in members:
            state = atomic.read_json(plan.cell_dir(run_root, cell) / "state.json") or {}
            s, error = cell_status(run_root, cell, queue, jobs, state)
            counts[s] += 1
            if s == "failed":
                failures.append((stage, cell.id, error))
            if state.get("interrupted_at_steps"):
                preempted.append(len(state["interrupted_at_steps"]))
        table[stage] = counts
    return {
        "stages": table,
        "failures": failures,
        "scheduler": queue is not None,
        "preempted": {"cells": len(preempted), "times": sum(preempted)},
    }


def render(report: dict) -> str:
    lines = [f"{'stage':<12}" + "".join(f"{c:>10}" for c in COLUMNS) + f"{'total':>10}"]
    done = total = 0
    for stage, counts in report["stages"].items():
        n = sum(counts.values())
        done, total = done + counts["done"], total + n
        lines.append(f"{stage:<12}" + "".join(f"{counts[c]:>10}" for c in COLUMNS) + f"{n:>10}")
    width = 40
    filled = round(width * done / total) if total else width
    lines.append(f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} cells done")
    if report["preempted"]["cells"]:
        p = report["preempted"]
        lines.append(f"preempted {p['times']} time(s), {p['cells']} cell(s); each resumed from its checkpoint")
    if not report["scheduler"]:
        lines.append("(squeue not available: running/pending come from the cells' own state files)")
    for stage, cell, error in report["failures"]:
        lines.append(f"failed {stage}/{cell}: {error}")
    return "\n".join(lines)
