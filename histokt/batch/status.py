"""`histokt status RUN_ROOT`: where a study stands, from the run root and squeue (never sacct)."""

from pathlib import Path

from histokt import atomic, lease
from histokt.batch import pool, retry, slurm
from histokt.batch.cellrun import LEASE
from histokt.study import plan

COLUMNS = ("done", "running", "pending", "requeued", "failed", "blocked", "lost")


def cell_status(
    run_root: Path, cell: plan.Cell, queue: dict | None, jobs: dict, state: dict, pools: dict | None = None
) -> tuple[str, str | None]:
    """(status, what to say about it) of one cell; ``state`` is its state.json (or {}).

    blocked: an input cell failed or is not done (the cell names it, exit 4); lost: the cell said it was
    running, but its task is no longer queued and left no word (a node failure, the OOM killer, a time
    limit without the signal): its log is the place to look. ``pools``: cell id -> the job of the pool of
    workers it was submitted to (histokt.batch.pool)."""
    pools = pools or {}
    if plan.is_done(run_root, cell):
        return "done", None
    if cell.id in pools and cell.id not in jobs:  # a pool's cell: its lease says whether a worker runs it
        return pool_cell_status(run_root, cell, state)
    task = jobs.get(cell.id)
    in_queue = queue.get(task) if queue and task else None
    if in_queue == "RUNNING":
        return "running", None
    if state.get("status") == "failed" and not in_queue:
        return "failed", state.get("error")
    if state.get("status") == "blocked" and not in_queue:
        return "blocked", f"blocked by {state.get('blocked_by') or 'an input cell'}"
    if state.get("status") == "interrupted":
        return "requeued", None
    if state.get("status") == "running" and queue is None:
        return "running", None  # no scheduler to ask (local runs): trust the cell's own word
    if state.get("status") == "running" and task and not in_queue:
        return (
            "lost",
            f"job {task} ended without a word (node failure, out of memory, time limit?); "
            f"log: {log_of(run_root, task)}",
        )
    return "pending", None


def pool_cell_status(run_root: Path, cell: plan.Cell, state: dict) -> tuple[str, str | None]:
    """A pool's cell: running while a live worker holds its lease; lost where its worker left it running
    without a word; failed, blocked or requeued as its state says; else pending (for the next free worker)."""
    status = state.get("status")
    if status == "running":
        if lease.live(plan.cell_dir(run_root, cell) / LEASE) is not None:
            return "running", None
        return "lost", f"its worker ({(state.get('job') or 'no job')}) ended without a word; see its log"
    if status == "failed" and not retry.wanted(state):
        return "failed", state.get("error")
    if status == "blocked":
        return "blocked", f"blocked by {state.get('blocked_by') or 'an input cell'}"
    if status == "interrupted":
        return "requeued", None
    return "pending", None


def log_of(run_root: Path, task: str) -> Path:
    """Where submitit keeps the output of SLURM task ``task`` (``<array>_<i>`` or a job id)."""
    from submitit.core.utils import JobPaths

    return JobPaths(Path(run_root) / "submitit" / "%j", job_id=task, task_id=0).stdout


def status(run_root) -> dict:
    run_root = Path(run_root)
    cells = plan.read(run_root)
    queue, jobs, pools = slurm.squeue(), slurm.cell_jobs(run_root), slurm.pool_jobs(run_root)
    table, failures, preempted, crashes, states = {}, [], [], [], []
    for stage, members in cells.items():
        counts = dict.fromkeys(COLUMNS, 0)
        for cell in members:
            state = atomic.read_json(plan.cell_dir(run_root, cell) / "state.json") or {}
            s, error = cell_status(run_root, cell, queue, jobs, state, pools)
            counts[s] += 1
            if s in ("failed", "blocked", "lost"):
                failures.append((stage, cell.id, error, s))
            if state.get("interrupted_at_steps"):
                preempted.append(len(state["interrupted_at_steps"]))
            if retry.failures(state):
                crashes.append(crash_line(stage, cell.id, s, state, run_root))
                states.append((cell.id, state))
        table[stage] = counts
    return {
        "stages": table,
        "failures": failures,
        "scheduler": queue is not None,
        "preempted": {"cells": len(preempted), "times": sum(preempted)},
        "crashes": crashes,
        "suspects": retry.suspects(states),
        "workers": [w for w in pool.workers(run_root) if not w.get("ended") and worker_alive(w, queue)],
    }


def worker_alive(w: dict, queue: dict | None) -> bool:
    """A worker that has not said it ended, and whose task is running (where squeue answers)."""
    if queue is None:
        return True
    key = str(w.get("worker"))  # <job>_<task>; a pool of one worker is a plain job, <job>_0
    return "RUNNING" in (queue.get(key), queue.get(key.removesuffix("_0")))


def crash_line(stage: str, cell: str, status: str, state: dict, run_root: Path) -> str:
    """'crashed 2 time(s), retried (done): pretrain/A-x on gpu1, gpu2; logs: L1, L2' for one cell."""
    tries = retry.failures(state)
    if status == "done":
        outcome = "retried, done"
    elif retry.wanted(state):
        outcome = "to be retried"
    else:
        outcome = "not retried again (max_retries)" if state.get("crashed") else "then failed otherwise"
    logs = [f.get("log") or (str(log_of(run_root, f["job"])) if f.get("job") else "?") for f in tries]
    return (
        f"crashed {len(tries)} time(s), {outcome}: {stage}/{cell} on {', '.join(retry.crashed_on(state))}; "
        f"logs: {', '.join(logs)}"
    )


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
    for stage, cell, error, *kind in report["failures"]:
        lines.append(f"{kind[0] if kind else 'failed'} {stage}/{cell}: {error}")
    for w in report.get("workers", []):
        doing = f"runs {w['cell']}" if w.get("cell") else "waits for a ready cell"
        lines.append(f"worker {w['worker']} (pool {w['pool']}) on {w['host']}: {doing}; {w['ran']} cells so far")
    lines += report.get("crashes", [])
    for node, crashed in report.get("suspects", {}).items():
        lines.append(
            f"suspect node {node}: {len(crashed)} cells crashed there ({', '.join(crashed[:5])}"
            f"{', …' if len(crashed) > 5 else ''}); ask your admins to drain it"
        )
    return "\n".join(lines)
