"""`histokt sweep SPEC`: a study's cells submitted as SLURM job arrays through submitit, or run locally.

Idempotent: every run re-plans the spec, skips cells that are done (their marker exists) or still queued
from an earlier submission (``RUN_ROOT/submissions.jsonl`` + ``squeue``), and submits the rest, in waves
under the queue budget (``next_wave``).

Dependencies are per task: a cell waits (``afterany``) only for the tasks of the cells whose outputs it reads
(its model's Stage-A cell, its merge, its dataset's standardize cells), so a transfer starts as soon as its
one source model is trained. Cells with the same dependencies share an array. ``afterany``, not ``afterok``:
with ``afterok`` a dependant of a failed task would stay pending forever (DependencyNeverSatisfied) and hold
a place in the user's queue limit until someone cancels it; with ``afterany`` it starts, finds its input
missing and exits 4 (blocked) at once, without loading anything, and a watching sweep cancels it before it
starts where it can (``cancel_blocked``). The collector waits for every array of the study. Arrays are cut
below the cluster's MaxArraySize.
"""

import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from histokt import atomic, provenance
from histokt.batch import pool, rehearse, retry, slurm
from histokt.batch.cellrun import CellTask
from histokt.batch.cost import IMG_PER_S, render, study_cost
from histokt.batch.inputs import Inputs, record_blocked
from histokt.errors import UserError
from histokt.study import plan, versions
from histokt.study.spec import STAGES, Resources, load

DEFAULT_MAX_QUEUED = 1000


@dataclass
class SweepConfig:
    spec: Path = field(metadata={"args": ["spec"], "help": "the experiment spec, e.g. jobs/demo.toml"})
    executor: str = field(
        default="local", metadata={"choices": ("local", "slurm"), "help": "local (this machine) or slurm"}
    )
    run_root: Optional[Path] = field(default=None, metadata={"help": "override the spec's study.run_root"})
    dry_run: bool = field(default=False, metadata={"help": "print the cell counts and sbatch scripts; submit nothing"})
    only: Optional[str] = field(default=None, metadata={"choices": STAGES, "help": "submit this stage only"})
    container: Optional[str] = field(default=None, metadata={"help": "Apptainer image (.sif) to run every cell in"})
    force: bool = field(default=False, metadata={"help": "re-plan a run root that was made from another spec"})
    parallel: int = field(default=2, metadata={"help": "local executor: cells running at once (default 2)"})
    max_queued: Optional[int] = field(
        default=None,
        metadata={
            "help": "most of this study's tasks queued or running at once (default: study.max_queued, else your "
            "MaxSubmitJobs where sacctmgr tells it, else 1000); the rest go in later waves"
        },
    )
    watch: bool = field(
        default=False,
        metadata={"help": "slurm: stay and submit the next wave as the queue drains, until the study is done"},
    )
    watch_interval: float = field(
        default=30.0, metadata={"help": "--watch: seconds between two looks at the queue (default 30)"}
    )
    throughput: float = field(
        default=IMG_PER_S,
        metadata={"help": f"--dry-run: training images/s per GPU for the estimate (default {IMG_PER_S:,.0f}, H100)"},
    )
    rehearse: bool = field(
        default=False,
        metadata={
            "help": "run the whole plan with cells that do no work (each writes the files later cells read, "
            "then its marker), in its own run root (default: the spec's run_root + '-rehearsal'): checks waves, "
            "dependencies and failures at full size before a GPU-hour is spent"
        },
    )
    rehearse_fail: Optional[str] = field(
        default=None,
        metadata={"help": "--rehearse: cells whose id matches one of these comma-separated globs fail, as planted"},
    )
    pool: Optional[int] = field(
        default=None,
        metadata={
            "help": "N workers per kind of resource that each take cell after cell (task farming: a few long "
            "jobs instead of one per cell; default: study.pool, else 0 = one task per cell)"
        },
    )
    allow_version_change: bool = field(
        default=False,
        metadata={
            "help": "go on although this histokt, Python, torch or image differs from the one the study started "
            "with (RUN_ROOT/versions.json records both; the collector's report lists the cells of each)"
        },
    )
    rehearse_crash: Optional[str] = field(
        default=None,
        metadata={
            "help": "--rehearse: cells whose id matches one of these comma-separated globs crash, as planted; "
            "GLOB:N crashes only on its first N tries (a transient failure: see the retries at work)"
        },
    )
    progress: bool = field(default=True, metadata={"help": "progress bars (--no-progress to hide)"})


# -- planning --------------------------------------------------------------------------------------------------


def prepare(cfg: SweepConfig):
    if cfg.rehearse_fail and not cfg.rehearse:
        raise UserError("--rehearse-fail: only with --rehearse")
    if cfg.rehearse_crash and not cfg.rehearse:
        raise UserError("--rehearse-crash: only with --rehearse")
    crashes = [g.strip() for g in (cfg.rehearse_crash or "").split(",") if g.strip()]
    for rule in crashes:
        rehearse.crash_rule(rule)  # a UserError where it is not GLOB or GLOB:N
    spec = load(cfg.spec)
    default = f"{spec.run_root}-rehearsal" if cfg.rehearse else spec.run_root
    run_root = Path(cfg.run_root or default).absolute()
    cells = plan.expand(spec)
    if not cfg.dry_run:
        globs = [g.strip() for g in (cfg.rehearse_fail or "").split(",") if g.strip()]
        rehearse.claim(run_root, cfg.rehearse, globs, crashes)
        plan.write(run_root, spec, cells, force=cfg.force)
        versions.pin(run_root, cell_identity(cfg, spec), cfg.allow_version_change)
    stages = [cfg.only] if cfg.only else list(cells)
    if cfg.only and cfg.only not in cells:
        raise UserError(f"--only {cfg.only}: the spec has no such stage")
    return spec, run_root, cells, stages


def todo(run_root: Path, cells: dict, stages: list, queued: set) -> dict[str, list[int]]:
    out = {
        s: [i for i, c in enumerate(cells[s]) if c.id not in queued and not plan.is_done(run_root, c)]
        for s in stages
        if s != "collect"
    }
    if "collect" in stages:  # not again while one is queued: it waits for every array queued before it
        stale = collect_stale(run_root, cells, any(out.values()))
        out["collect"] = [0] if stale and cells["collect"][0].id not in queued else []
    return out


def raw_warnings(where, cells: dict, work: dict) -> list[str]:
    """A line for each dataset to standardize whose raw folder is absent: a spec loads without its raw data
    (a study is costed before any download, and goes on after a purge), and only a standardize cell that
    still has to run needs it (it then fails with its clear error)."""
    needed = {
        cells["standardize"][i].args["name"]: cells["standardize"][i].args["raw"] for i in work.get("standardize", [])
    }
    return [
        f"{where}: datasets.{name}.raw: {raw}: no such folder; its standardize cells will fail until the raw "
        f"data is staged there"
        for name, raw in sorted(needed.items())
        if not Path(raw).is_dir()
    ]


def collect_stale(run_root: Path, cells: dict, more_work: bool) -> bool:
    """The collector runs again whenever a cell finished after its last summary (or more cells will)."""
    marker = plan.cell_dir(run_root, cells["collect"][0]) / "done.json"
    if more_work or not marker.exists():
        return True
    newest = max(
        (
            plan.marker(run_root, c).stat().st_mtime
            for s, cs in cells.items()
            if s != "collect"
            for c in cs
            if plan.is_done(run_root, c)
        ),
        default=0.0,
    )
    return newest > marker.stat().st_mtime


def sweep(cfg: SweepConfig, skip: frozenset = frozenset()) -> dict:
    """Plan, then run or submit what is not done (or still queued); ``skip``: cell ids not to submit again
    (``watch`` passes those it submitted, so a failed cell is not retried in a loop)."""
    if cfg.parallel < 1:
        raise UserError(f"--parallel {cfg.parallel}: must be at least 1")
    if cfg.max_queued is not None and cfg.max_queued < 1:
        raise UserError(f"--max-queued {cfg.max_queued}: must be at least 1")
    if not cfg.watch_interval >= 1:
        raise UserError(f"--watch-interval {cfg.watch_interval}: must be at least 1 second")
    if not (math.isfinite(cfg.throughput) and cfg.throughput > 0):
        raise UserError(f"--throughput {cfg.throughput}: must be a positive number of images per second")
    spec, run_root, cells, stages = prepare(cfg)
    max_queued = queue_budget(cfg, spec)
    queued: dict[str, str] = {}
    cancelled: list[str] = []
    excluded: dict[str, list[str]] = {}
    if cfg.executor == "slurm" and not cfg.dry_run:
        queue = slurm.own_queue()  # one look per pass: what to skip, and what to cancel
        cancelled = cancel_blocked(run_root, cells, queue)
        excluded = exclude_crashed_nodes(spec, run_root, cells, queue)
        jobs = slurm.cell_jobs(run_root)
        gone = {jobs[c] for c in cancelled}
        queued = slurm.queued_cells(run_root, {t: s for t, s in queue.items() if t not in gone})
    work = todo(run_root, cells, stages, set(queued) | set(skip))
    counts = {s: {"total": len(cells[s]), "todo": len(work[s])} for s in stages}
    summary = {
        "run_root": str(run_root),
        "stages": counts,
        "queued": len(queued),
        "warnings": raw_warnings(cfg.spec, cells, work),
        "cancelled": cancelled,
        "excluded": excluded,
    }
    if cfg.dry_run:
        # as if every input cell not done were queued: one array per resource group and set of input cells
        inputs, done = Inputs(run_root, cells), set()
        if run_root.exists():
            done = inputs.done()
        size = slurm.DEFAULT_MAX_ARRAY_SIZE - 1
        arrays = {s: len(arrays_of(spec, s, cells[s], work[s], lambda c: inputs.needs(c) - done, size)) for s in work}
        costs = study_cost(spec, cells, work, arrays, max_queued, cfg.throughput)
        return {
            **summary,
            "scripts": dry_run_scripts(spec, run_root, cells, work, cfg),
            "cost": render(costs, max_queued, cfg.throughput),
            **dry_run_pools(spec, run_root, cells, work, cfg),
        }
    if not any(work.values()):
        return {**summary, "status": "nothing to do"}
    workers = pool_size(cfg, spec)
    if cfg.executor == "local" and workers:
        return {**summary, **run_pool_local(spec, run_root, cells, work, cfg, workers)}
    if cfg.executor == "local":
        return {**summary, **run_local(spec, run_root, cells, work, cfg)}
    if workers:  # every cell at once: the workers see to the order; a cell reading from a failed one is blocked
        caps, budget = None, 10**9
    else:
        caps = {s: resources(spec, s).array_parallelism - sum(c.id in queued for c in cells[s]) for s in work}
        budget = max_queued - len(queued)
    gave_up = set(skip) - set(queued)  # submitted by this watch and ended undone: never retried by it
    wave, left, blocked = next_wave(run_root, cells, work, queued, budget, caps, gave_up)
    by_id = {c.id: c for cs in cells.values() for c in cs}
    for cell, by in blocked.items():  # never submitted: recorded, for histokt status and the collector's report
        record_blocked(run_root, by_id[cell], by_id[by])
    summary.update(left=left, blocked=len(blocked), max_queued=max_queued)
    if not any(wave.values()):
        return {**summary, "status": "waiting", "arrays": []}
    if workers:
        return {**summary, **submit_pools(spec, run_root, cells, wave, cfg, queued, workers, max_queued)}
    return {**summary, **submit_slurm(spec, run_root, cells, wave, cfg, queued)}


def pool_size(cfg: SweepConfig, spec) -> int:
    """Workers per pool: --pool, else study.pool, else 0 (one task per cell)."""
    n = cfg.pool if cfg.pool is not None else (spec.pool or 0)
    if n < 0:
        raise UserError(f"--pool {n}: must be at least 0 (0: one task per cell)")
    return n


def queue_budget(cfg: SweepConfig, spec) -> int:
    """Most of this study's tasks queued or running at once: --max-queued, study.max_queued, the user's
    MaxSubmitJobs (sacctmgr, SLURM only), else 1000 (a common cap of a user's queued jobs)."""
    if cfg.max_queued is not None:
        return cfg.max_queued
    if spec.max_queued is not None:
        return spec.max_queued
    if cfg.executor == "slurm" and not cfg.dry_run:
        return slurm.max_submit_jobs() or DEFAULT_MAX_QUEUED
    return DEFAULT_MAX_QUEUED


def next_wave(
    run_root: Path,
    cells: dict,
    work: dict,
    queued: dict,
    budget: int,
    caps: dict[str, int] | None = None,
    gave_up: set[str] = frozenset(),  # type: ignore[assignment]
) -> tuple[dict[str, list[int]], int, dict[str, str]]:
    """The cells to submit now, how many wait for a later wave, and the blocked ones (cell id -> the id of the
    failed or blocked cell it reads from).

    In stage order, at most ``budget`` cells, at most ``caps[stage]`` of a stage (what is left of its running-
    task cap, %N, after its tasks still queued: so the cap holds across its arrays, each getting a share), and
    a cell only where every cell it reads from is done, still queued or in this wave (``Inputs``): a wave never
    holds a cell that would start before its inputs can exist. A cell reading from a failed or blocked cell
    (or one in ``gave_up``) that is not submitted again now is blocked: it takes no GPU and no place in the
    queue. The collector goes in the last wave."""
    inputs = Inputs(run_root, cells)
    inputs.dead |= set(gave_up)
    ready = set(queued) | inputs.done()
    caps = dict(caps or {})
    wave: dict[str, list[int]] = {}
    left = 0
    blocked: dict[str, str] = {}
    for stage, indices in work.items():
        if stage == "collect":
            continue
        for i in indices:
            cell = cells[stage][i]
            missing = inputs.needs(cell) - ready
            dead = sorted(n for n in missing if inputs.is_dead(n))
            if dead:
                inputs.dead.add(cell.id)
                blocked[cell.id] = dead[0]
            elif budget > 0 and not missing and caps.get(stage, 1) > 0:
                wave.setdefault(stage, []).append(i)
                ready.add(cell.id)
                budget -= 1
                if stage in caps:
                    caps[stage] -= 1
            else:
                left += 1
    collect = work.get("collect", [])
    if collect and left == 0 and budget > 0:
        wave["collect"] = collect
    else:
        left += len(collect)
    return {s: wave.get(s, []) for s in work}, left, blocked


def cancel_blocked(run_root: Path, cells: dict, queue: dict[str, str]) -> list[str]:
    """Pending tasks (in ``queue``, one squeue's answer) of cells that read from a failed or blocked cell:
    cancelled (they would start only to exit 4), and recorded as blocked, naming the cell that blocks them.
    Returns their cell ids."""
    jobs = slurm.cell_jobs(run_root)
    inputs = Inputs(run_root, cells)
    queued = {cell for cell, task in jobs.items() if task in queue}
    ready = queued | inputs.done()
    cancelled = []
    for members in cells.values():
        for cell in members:
            task = jobs.get(cell.id)
            if task is None or queue.get(task) != "PENDING":
                continue
            dead = sorted(n for n in inputs.needs(cell) - ready if inputs.is_dead(n))
            if not dead:
                continue
            slurm.cancel(task)
            inputs.dead.add(cell.id)
            ready.discard(cell.id)
            record_blocked(run_root, cell, inputs.by_id[dead[0]])
            cancelled.append(cell.id)
    return cancelled


def exclude_crashed_nodes(spec, run_root: Path, cells: dict, queue: dict[str, str]) -> dict[str, list[str]]:
    """Pending tasks of crashed cells to be retried (requeued by their batch script): kept off the nodes they
    crashed on, where their partition has another (histokt.batch.retry). {cell id: nodes excluded}."""
    jobs = slurm.cell_jobs(run_root)
    out = {}
    for stage, members in cells.items():
        for cell in members:
            task = jobs.get(cell.id)
            if task is None or queue.get(task) != "PENDING":
                continue
            state = atomic.read_json(plan.cell_dir(run_root, cell) / "state.json") or {}
            nodes = retry.crashed_on(state)
            if retry.wanted(state) and nodes and slurm.exclude(task, nodes, resources(spec, stage).partition):
                out[cell.id] = nodes
    return out


def watch(cfg: SweepConfig, report=print) -> dict:
    """Sweep, then, while cells run or wait for a later wave, look again every ``watch_interval`` seconds
    (one squeue, and sbatch only for a new wave) and submit what the budget allows: one command for a study
    of any size. A cell submitted once is not submitted again by the same watch (a failed cell is not
    retried in a loop; its dependants are blocked). A pool's cell is submitted again in a new pool where its
    workers all left it open (gone idle, or at their time limit), unless it failed for good or was pooled
    ``POOLED_AT_MOST`` times. ``report`` gets a line per wave."""
    submitted: set[str] = set()
    pooled: dict[str, int] = {}  # cell id -> pools it was submitted to by this watch
    told: set[tuple] = set()  # retries kept off nodes, said once
    run_root: Path | None = None
    while True:
        skip = set(submitted)
        if pooled and run_root is not None:
            skip |= given_up_in_pools(run_root, plan.read(run_root), pooled)
        out = sweep(cfg, skip=frozenset(skip))
        run_root = Path(out["run_root"])
        for record in out.get("records", []):
            if record.get("workers"):
                for cell in record["cells"]:
                    pooled[cell] = pooled.get(cell, 0) + 1
            else:
                submitted.update(record["cells"])
        for cell, nodes in out.get("excluded", {}).items():
            if (cell, tuple(nodes)) not in told:
                told.add((cell, tuple(nodes)))
                report(f"{cell}: crashed on {', '.join(nodes)}; its retry waits for another node")
        if out.get("cancelled"):
            n = len(out["cancelled"])
            report(f"cancelled {n} pending cells that read from a failed cell: {', '.join(out['cancelled'][:10])}")
        for stage, job, n in out.get("arrays", []):
            report(f"submitted {stage}: job {job} ({n} cells)")
        if not out.get("queued") and not out.get("arrays") and not out.get("left"):
            return out
        report(
            f"{time.strftime('%H:%M:%S')}: {out.get('queued', 0)} cells queued or running, "
            f"{out.get('left', 0)} wait for a later wave (budget {out.get('max_queued')})"
        )
        time.sleep(cfg.watch_interval)


POOLED_AT_MOST = 3


def given_up_in_pools(run_root: Path, cells: dict, pooled: dict[str, int]) -> set[str]:
    """Cells of this watch's pools not to pool again: failed for good or blocked, or pooled too often."""
    by_id = {c.id: c for cs in cells.values() for c in cs}
    out = set()
    for cell, n in pooled.items():
        if cell not in by_id or plan.is_done(run_root, by_id[cell]):
            continue
        state = atomic.read_json(plan.cell_dir(run_root, by_id[cell]) / "state.json") or {}
        if retry.failed_for_good(state) or n >= POOLED_AT_MOST:
            out.add(cell)
    return out


# -- local -----------------------------------------------------------------------------------------------------


def run_local(spec, run_root: Path, cells, work, cfg: SweepConfig) -> dict:
    """Stage by stage through submitit's LocalExecutor, at most --parallel cells at once."""
    import submitit

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.parallel)))
    executor = submitit.LocalExecutor(folder=str(submitit_folder(run_root)))
    failed = 0
    for stage, indices in work.items():
        if not indices:
            continue
        executor.update_parameters(timeout_min=resources(spec, stage).time_min)
        os.environ["HISTOKT_MAX_RETRIES"] = str(resources(spec, stage).max_retries)  # read by the crashed cell
        bar = tqdm(total=len(indices), desc=stage, unit="cell", file=sys.stderr, disable=None if cfg.progress else True)
        pending: list[int] = list(indices)
        running: list[tuple[submitit.Job, int]] = []
        while pending or running:
            while pending and len(running) < cfg.parallel:
                i = pending.pop(0)
                running.append((executor.submit(CellTask(str(run_root), stage, i)), i))
            time.sleep(0.2)  # polling local processes; they report through their files, not through us
            for job, i in [(j, i) for j, i in running if j.done()]:
                running.remove((job, i))
                state = atomic.read_json(plan.cell_dir(run_root, cells[stage][i]) / "state.json") or {}
                if retry.wanted(state):  # crashed, with tries left: again, after the cells waiting now
                    pending.append(i)
                else:
                    bar.update()
        bar.close()
        failed += sum(1 for i in indices if not plan.is_done(run_root, cells[stage][i]))
    return {"status": "finished" if not failed else "finished with failures", "not_done": failed}


def run_pool_local(spec, run_root: Path, cells, work, cfg: SweepConfig, workers: int) -> dict:
    """--pool N here: N workers (histokt.batch.pool) through submitit's LocalExecutor, sharing every cell."""
    import submitit

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    ids = [cells[s][i].id for s, indices in work.items() for i in indices]
    # every cell gets the threads the local executor gives (OMP_NUM_THREADS); the one node there is: a crashed
    # cell is retried here
    time_min = float(spec.pool_time_min or pool.DEFAULT_TIME_MIN)
    worker = make_worker(spec, run_root, cells, "local", ids, [], time_min, time.time(), [retry.node()], threads=False)
    worker.poll_s = 0.5
    executor = submitit.LocalExecutor(folder=str(submitit_folder(run_root)))
    executor.update_parameters(timeout_min=int(worker.time_min))
    jobs = [executor.submit(worker) for _ in range(workers)]
    bar = tqdm(total=len(ids), desc="pool", unit="cell", file=sys.stderr, disable=None if cfg.progress else True)
    by_id = {c.id: c for cs in cells.values() for c in cs}
    while not all(j.done() for j in jobs):
        time.sleep(0.5)
        bar.n = sum(plan.is_done(run_root, by_id[c]) for c in ids)
        bar.refresh()
    bar.close()
    failed = sum(1 for c in ids if not plan.is_done(run_root, by_id[c]))
    return {"status": "finished" if not failed else "finished with failures", "not_done": failed}


def submit_pools(spec, run_root: Path, cells, wave, cfg: SweepConfig, queued: dict, workers: int, budget: int) -> dict:
    """Submit the pools of workers for the wave's cells that can be pooled (histokt.batch.pool), then arrays
    for the rest (DDP cells), which wait for the pools whose cells they read from."""
    import submitit

    def res_of(c: plan.Cell) -> Resources:
        return resources(spec, c.stage, plan.cell_dataset(c))

    n = max(1, min(workers, budget - len(set(queued.values()))))
    pools, rest = plan_pools(spec, cells, wave, n)
    by_id = {c.id: c for cs in cells.values() for c in cs}
    python = python_command(cfg.container or spec.container, run_root, spec)
    since = time.time()
    task_of, submitted = dict(queued), []
    for p in pools:
        nodes = slurm.partition_nodes(p.resources.partition)
        others = [c for q in pools if q is not p for c in q.cells if pool.fits(res_of(by_id[c]), p.resources)]
        nodes_known = sorted(nodes) if nodes else None
        worker = make_worker(spec, run_root, cells, p.name, p.cells, others, p.resources.time_min, since, nodes_known)
        executor = submitit.SlurmExecutor(folder=str(submitit_folder(run_root)), max_num_timeout=1000, python=python)
        executor.update_parameters(**batch_parameters(p.resources, f"histokt-{spec.name}-pool-{p.name}", run_root, []))
        with executor.batch():
            jobs = [executor.submit(worker) for _ in range(p.workers)]
        job = slurm.job_of(jobs[0].job_id)
        record = {
            "job": job,
            "stage": "pool",
            "pool": p.name,
            "stages": p.stages,
            "cells": p.cells,
            "array": p.workers > 1,
            "workers": p.workers,
            "after": [],
            "time": since,
            "queued_before": len(set(queued.values())),
        }
        slurm.record_submission(run_root, record)
        submitted.append(record)
        task_of.update(dict.fromkeys(p.cells, job))
    out = submit_slurm(spec, run_root, cells, rest, cfg, task_of) if any(rest.values()) else {"records": []}
    records = [*submitted, *out["records"]]
    return {
        "status": "submitted",
        "arrays": [(f"pool {r['pool']}" if "workers" in r else r["stage"], r["job"], len(r["cells"])) for r in records],
        "records": records,
    }


def plan_pools(spec, cells, work, workers: int) -> tuple[list[pool.PoolPlan], dict[str, list[int]]]:
    """The pools of ``workers`` for the cells of ``work``, and the rest for arrays (histokt.batch.pool)."""
    return pool.plan_pools(cells, work, workers, spec.pool_time_min, lambda s, d: resources(spec, s, d))


def make_worker(
    spec, run_root: Path, cells, name: str, mine: list[str], others: list[str], time_min: float, since: float,
    nodes: list[str] | None, threads: bool = True,
) -> pool.Worker:  # fmt: skip
    """A pool's worker for ``mine`` (then ``others``): each cell's time_min as its first estimate, its CPUs as
    its threads (unless ``threads`` is False), its stage's max_retries; the spec's idle limit."""
    by_id = {c.id: c for cs in cells.values() for c in cs}
    own = [resources(spec, by_id[c].stage, plan.cell_dataset(by_id[c])) for c in [*mine, *others]]
    ids = [*mine, *others]
    return pool.Worker(
        str(run_root),
        name,
        mine,
        others,
        {c: r.time_min for c, r in zip(ids, own)},
        {c: r.cpus for c, r in zip(ids, own)} if threads else {},
        {s: resources(spec, s).max_retries for s in cells},
        float(time_min),
        since,
        nodes,
        idle_min=spec.pool_idle_min if spec.pool_idle_min is not None else pool.DEFAULT_IDLE_MIN,
    )


def resources(spec, stage: str, dataset: str | None = None) -> Resources:
    """A stage's resources, with ``dataset``'s overrides (``per_dataset``) where it has some."""
    r = spec.stages[stage].resources if stage in spec.stages else Resources()
    return r.for_dataset(dataset)


def resource_groups(spec, stage: str, cells: list, indices: list[int]) -> list[tuple[str | None, list[int]]]:
    """The cells to submit, grouped by the dataset override they get (an array has one set of resources):
    the cells without an override first, then one group per overridden dataset, in order."""
    overridden = resources(spec, stage).per_dataset
    groups: dict[str | None, list[int]] = {}
    for i in indices:
        name = plan.cell_dataset(cells[i])
        groups.setdefault(name if name in overridden else None, []).append(i)
    return sorted(groups.items(), key=lambda g: (g[0] is not None, g[0] or ""))


# -- slurm -----------------------------------------------------------------------------------------------------


def chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[a : a + size] for a in range(0, len(indices), size)]


def python_command(container: str | None, run_root: Path, spec) -> str | None:
    """The interpreter submitit runs in each task: the host's, or Apptainer's around the image's, with every
    path of the study bound (``bind_paths``) and the node-local staging folder where the site sets one."""
    if not container:
        return None
    # the image's real path, its folder bound: APPTAINER_CONTAINER names it inside, and provenance reads its
    # SIF ID from there (a symlink, or a folder not bound, would leave the result without the image's identity)
    image = Path(container).resolve()
    binds = ",".join(bind_paths(run_root, spec, image))
    # expanded by the job's shell, on the node: $SLURM_TMPDIR (staging) and a $TORCH_HOME of staged weights
    node = "${SLURM_TMPDIR:+,$SLURM_TMPDIR}${TORCH_HOME:+,$TORCH_HOME}"
    # the image's histokt, never the host's: no PYTHONPATH from the host, and no submission folder first on
    # sys.path (-P; a checkout of histokt there would shadow the image's)
    return f"apptainer exec --nv --bind {binds}{node} --env PYTHONPATH= {shlex.quote(str(image))} python -P"


def check_image(container: str) -> dict:
    """The image runs this histokt on this Python minor version, or a UserError before anything is submitted:
    submitit pickles each task here and the image's Python unpickles it (another minor version, or another
    histokt, fails in every task instead). Returns the identity its cells will record (``versions``)."""
    import histokt

    if not Path(container).is_file():
        raise UserError(f"--container {container}: no such image (make image builds one)")
    probe = (
        "import json, sys, histokt; from histokt import provenance as p; "
        "print(f'{sys.version_info[0]}.{sys.version_info[1]} {histokt.__version__}'); "
        "print(json.dumps(p.runtime(p.torch_version())))"
    )
    command = ["apptainer", "exec", "--env", "PYTHONPATH=", container, "python", "-P", "-c", probe]
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd="/")
    except FileNotFoundError:
        raise UserError("apptainer: not found on this host; --container needs Apptainer >= 1.1 here") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"--container {container}: the image did not answer in 300 s") from None
    ours = f"{sys.version_info[0]}.{sys.version_info[1]} {histokt.__version__}"
    lines = r.stdout.strip().splitlines()
    theirs = lines[0].strip() if lines else ""
    if r.returncode != 0 or theirs != ours:
        why = theirs or (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        raise UserError(
            f"--container {container}: the image has Python and histokt {why!r}, this host {ours!r}: submitit "
            f"needs both equal; rebuild the image from this checkout (make image)"
        )
    python, version = theirs.split()
    rt = {"python": python, "histokt": version, **(json.loads(lines[1]) if len(lines) > 1 else {})}
    # the image's ID read here: inside, the probe's path may not be bound
    image = str(Path(container).resolve())
    return provenance.identity({**rt, "container": {"image": image, "sif_id": provenance.sif_id(image)}})


def cell_identity(cfg: SweepConfig, spec) -> dict:
    """What will run the cells (``provenance.identity``): the image's with --container on SLURM, else this
    host's."""
    container = cfg.container or spec.container
    if container and cfg.executor == "slurm":
        return check_image(container)
    return provenance.identity(provenance.runtime(provenance.torch_version()))


def bind_paths(run_root: Path, spec, image: Path | None = None) -> list[str]:
    """The folders the cells read or write: the run root, the store's folder and every raw folder that exists
    now (Apptainer refuses to bind a missing one; a purged raw folder is needed by no cell that runs), and the
    image's folder where one is given, none inside another."""
    paths = {Path(run_root).absolute(), Path(spec.store).absolute().parent}
    if image is not None:
        paths.add(Path(image).parent)
    paths |= {Path(d.raw).absolute() for d in spec.datasets.values() if Path(d.raw).is_dir()}
    ordered = sorted(paths)
    return [str(p) for p in ordered if not any(q != p and p.is_relative_to(q) for q in ordered)]


def slurm_parameters(spec, stage: str, run_root: Path, dependency: list[str], dataset: str | None = None) -> dict:
    return batch_parameters(resources(spec, stage, dataset), f"histokt-{spec.name}-{stage}", run_root, dependency)


def batch_parameters(r: Resources, job_name: str, run_root: Path, dependency: list[str]) -> dict:
    """submitit's parameters for an array whose tasks each get ``r``."""
    extra: dict[str, Any] = {"requeue": True}
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": r.time_min,
        "nodes": r.nodes,
        "cpus_per_task": r.cpus,
        "mem": f"{int(r.mem_gb * 1024)}MB",
        "ntasks_per_node": r.ranks_per_node,  # DDP: each task is one rank
        "array_parallelism": r.array_parallelism,
        "signal_delay_s": 120,
        "additional_parameters": extra,
        # one intra-op thread per allocated CPU: no oversubscription, and the same arithmetic on every requeue
        "setup": [
            f"export HISTOKT_RUN_ROOT={shlex.quote(str(run_root))}",
            "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
            # a SIGTERM to the batch shell (scancel --batch) must not kill it before its teardown requeues the
            # task (the cell checkpoints on the SIGTERM its tasks get and asks for the requeue): the trap waits
            "trap 'echo \"histokt: SIGTERM: the cell checkpoints and asks to be requeued\" >&2' TERM",
        ],
        "teardown": slurm.teardown_lines(run_root),
        "stderr_to_stdout": True,
    }
    if r.nodes * r.ranks_per_node > 1:
        # a rank that dies (a lost node, an OOM kill) ends the whole step at once: the others would wait in
        # a collective until the NCCL timeout
        params["srun_args"] = ["--kill-on-bad-exit=1"]
    if r.gres:
        params["gres"] = r.gres
    elif r.gpus:
        params["gpus_per_node"] = r.gpus
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(r, key):
            params[key] = getattr(r, key)
    if r.time_floor_min:
        extra["time_min"] = r.time_floor_min
    if r.max_requeues:
        params["setup"].append(f"export HISTOKT_MAX_REQUEUES={r.max_requeues}")
    params["setup"].append(f"export HISTOKT_MAX_RETRIES={r.max_retries}")
    for option in r.extra:  # "--exclusive" -> exclusive: True, "--mail-type=END" -> mail_type: "END"
        name, _, value = option[2:].partition("=")
        extra[name.replace("-", "_")] = value or True
    if dependency:
        params["dependency"] = "afterany:" + ":".join(dependency)
    return params


def dry_run_scripts(spec, run_root: Path, cells, work, cfg: SweepConfig) -> dict[str, str]:
    """The sbatch script of each stage's first array, as submitit would write it (nothing is written); the
    dependency names no job id (none exists yet)."""
    python = python_command(cfg.container or spec.container, run_root, spec) or shlex.quote(sys.executable)
    folder = submitit_folder(run_root)
    inputs = Inputs(run_root, cells)
    done = inputs.done() if run_root.exists() else set()
    scripts: dict[str, str] = {}
    for stage, indices in work.items():
        if not indices:
            continue
        if stage == "collect":
            group, deps, members = None, ("<every array of the study>",), indices
        else:
            size = slurm.DEFAULT_MAX_ARRAY_SIZE - 1
            group, deps, members = arrays_of(
                spec, stage, cells[stage], indices, lambda c: inputs.needs(c) - done, size
            )[0]
        after = ["<the tasks of its input cells>"] if deps and stage != "collect" else list(deps)
        params = slurm_parameters(spec, stage, run_root, after, group)
        params["array_parallelism"] = min(params["array_parallelism"], len(members))
        command = slurm.submit_command(python, folder)
        scripts[stage] = slurm.sbatch_script(command, folder, len(members) if len(members) > 1 else None, params)
    return scripts


def dry_run_pools(spec, run_root: Path, cells, work, cfg: SweepConfig) -> dict:
    """The other plan: pools of workers (--pool N; 16 where none is asked, to compare), one line and the sbatch
    script of each, and the cells left to arrays (DDP stages)."""
    n = pool_size(cfg, spec) or 16
    pools, rest = plan_pools(spec, cells, work, n)
    python = python_command(cfg.container or spec.container, run_root, spec) or shlex.quote(sys.executable)
    command = slurm.submit_command(python, submitit_folder(run_root))
    lines, scripts = [], {}
    for p in pools:
        r = p.resources
        lines.append(
            f"pool {p.name}: {p.workers} workers ({', '.join(p.stages)}: {len(p.cells)} cells), each "
            f"{r.gpus} GPU, {r.cpus} CPUs, {r.mem_gb:g} GB, {r.time_min} min"
        )
        params = batch_parameters(r, f"histokt-{spec.name}-pool-{p.name}", run_root, [])
        scripts[p.name] = slurm.sbatch_script(command, submitit_folder(run_root), p.workers, params)
    lines += [f"{stage}: {len(i)} cells in job arrays (DDP: not pooled)" for stage, i in rest.items() if i]
    return {"pool_workers": n, "pools": lines, "pool_scripts": scripts}


def submitit_folder(run_root: Path) -> Path:
    """Where submitit keeps each job's pickles, logs and sbatch file (``%j``: the job id)."""
    return run_root / "submitit" / "%j"


def arrays_of(spec, stage: str, cells: list, indices: list[int], needs, size: int) -> list[tuple]:
    """A stage's cells as arrays: one per resource group (dataset overrides) and set of dependencies
    (``needs(cell)``: the task ids it waits for), cut at ``size`` tasks; [(group, dependencies, indices)]."""
    groups: dict[tuple, list[int]] = {}
    for group, members in resource_groups(spec, stage, cells, indices):
        for i in members:
            groups.setdefault((group, tuple(sorted(needs(cells[i])))), []).append(i)
    return [(g, deps, chunk) for (g, deps), members in groups.items() for chunk in chunks(members, size)]


def shares(cap: int, sizes: list[int]) -> list[int]:
    """The stage's running-task cap split over its arrays (each array's %N): at least 1 and at most its size
    each, the smallest arrays served first so that no share is wasted; the sum is at most ``cap`` where
    ``cap >= len(sizes)`` (next_wave sees to it: never more cells in a wave than what is left of the cap)."""
    out = [0] * len(sizes)
    left = cap
    for k, i in enumerate(sorted(range(len(sizes)), key=lambda i: sizes[i])):
        out[i] = max(1, min(sizes[i], left // (len(sizes) - k)))
        left -= out[i]
    return out


def submit_slurm(spec, run_root: Path, cells, work, cfg: SweepConfig, queued: dict) -> dict:
    """Submit one wave: stage by stage, each cell depending on the tasks of its input cells (queued before, or
    in this wave); ``queued``: cell id -> task id of the cells still queued."""
    import submitit

    size = max(1, slurm.max_array_size() - 1)
    container = cfg.container or spec.container  # checked by cell_identity (sweep): this histokt and Python
    python = python_command(container, run_root, spec)
    inputs = Inputs(run_root, cells)
    task_of = dict(queued)  # cell id -> its task, for the dependencies of the cells that read from it
    pace = slurm.Pace()
    submitted: list[dict] = []
    in_queue = len(queued)
    for stage, indices in work.items():
        if stage == "collect":  # it reads every cell: it waits for every array of the study still queued
            every = sorted({t.split("_")[0] for t in task_of.values()})
            arrays = [(None, tuple(every), indices)] if indices else []
        else:

            def after(cell):
                return [task_of[n] for n in inputs.needs(cell) if n in task_of]

            arrays = arrays_of(spec, stage, cells[stage], indices, after, size)
        cap = resources(spec, stage).array_parallelism - sum(c.id in queued for c in cells[stage])
        for (group, deps, chunk), share in zip(arrays, shares(cap, [len(c) for _, _, c in arrays])):
            executor = submitit.SlurmExecutor(
                folder=str(submitit_folder(run_root)), max_num_timeout=1000, python=python
            )
            params = slurm_parameters(spec, stage, run_root, list(deps), group)
            params["array_parallelism"] = min(params["array_parallelism"], share)
            executor.update_parameters(**params)
            pace.wait()
            with executor.batch():
                jobs = [executor.submit(CellTask(str(run_root), stage, i)) for i in chunk]
            array = jobs[0].job_id.split("_")[0]
            record = {
                "job": array,
                "stage": stage,
                "cells": [cells[stage][i].id for i in chunk],
                "array": len(chunk) > 1,
                "after": list(deps),
                "time": time.time(),
                "queued_before": in_queue,  # this study's tasks already queued or running: with these, the budget
            }
            in_queue += len(chunk)
            slurm.record_submission(run_root, record)
            submitted.append(record)
            for k, cell in enumerate(record["cells"]):
                task_of[cell] = f"{array}_{k}" if record["array"] else array
    return {
        "status": "submitted",
        "arrays": [(r["stage"], r["job"], len(r["cells"])) for r in submitted],
        "records": submitted,
    }
