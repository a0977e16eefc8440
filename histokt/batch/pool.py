"""A pool of workers that pull cells (task farming): a few long jobs instead of one job per cell.

``histokt sweep SPEC --pool N`` submits, for each kind of resource (the GPU stages share one pool, the CPU
stages another; a partition, account, QoS, constraint or GPU type of its own makes another kind), one array
of N workers with the largest resources of its stages and a time limit of its own (``[study]
pool_time_min``, at least the longest cell's ``time_min``). Each worker repeatedly takes the next *ready*
cell (every cell it reads from is done) that no one else holds, through the cell's own lease (``cellrun``),
runs it in its own process (no job start, no container start, no torch import per cell), and moves on:

- cells that unblock the most others first (a Stage-A model before the transfers that read it), then plan
  order; its own pool's cells first, then, when none is ready, cells of another pool whose resources fit in
  its own (a GPU worker may standardize; a CPU worker never trains on a GPU);
- a cell whose input failed for good is recorded blocked; one that crashed is left to the bounded retries of
  ``retry``, never again on a node where it crashed (unless no other node is in the partition);
- it waits (polling, backing off to a minute) while cells it could run wait for inputs that are still to
  come, and exits when none is left, or after ``idle_min`` minutes without anything to run (a worker must
  not hold a GPU for hours waiting for someone else's Stage-A model; a watching sweep submits workers again
  when cells are ready and no worker is left);
- it takes a cell only where its estimate (the longest this worker has seen a cell of that stage and
  dataset take, x1.25, else the cell's ``time_min``) fits in the time left; where cells are open but none
  fits, it asks for a requeue (a fresh time limit) and exits;
- a preempted worker, or one at its time limit, checkpoints the cell it trains (SLURM's USR2, as for a
  one-cell task), asks its batch script for a requeue, and that cell resumes exactly in whichever worker
  takes it next; a cell that fails never stops a worker.

Each worker says what it runs in ``RUN_ROOT/pool/<job>_<task>.json`` (histokt status). Only cells of one
task on one node are pooled: a DDP stage of several GPUs or nodes stays in job arrays.
"""

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from histokt import atomic, lease
from histokt.batch import retry
from histokt.batch.cellrun import LEASE, CellBlocked, CellBusy, run_cell
from histokt.batch.inputs import Inputs, record_blocked
from histokt.batch.slurm import REQUEUE_DIR, job_key
from histokt.errors import EXIT_REQUEUE, UserError
from histokt.study import plan
from histokt.study.spec import Resources

POOL_DIR = "pool"
DEFAULT_TIME_MIN = 24 * 60
DEFAULT_IDLE_MIN = 10.0
MARGIN_S = 180.0  # SLURM's USR2 comes 120 s before the time limit: a cell is never started inside that
SAFETY = 1.25  # on the longest duration seen


# -- which pools ---------------------------------------------------------------------------------------------------


def poolable(r: Resources) -> bool:
    """One task on one node: a DDP cell of several GPUs or nodes needs a job step of its own."""
    return r.nodes == 1 and r.ranks_per_node == 1


def kind(r: Resources) -> tuple:
    return (r.gpus > 0, r.partition, r.account, r.qos, r.constraint, r.gres)


def name_of(r: Resources) -> str:
    return ("gpu" if r.gpus > 0 else "cpu") + "".join(f"-{x}" for x in (r.partition, r.qos, r.constraint) if x)


def fits(small: Resources, big: Resources) -> bool:
    """A cell asking for ``small`` can run in a worker holding ``big``: CPUs, memory and GPUs within (a CPU
    cell in a GPU worker leaves its GPU idle: a worker takes one only when none of its own pool is open)."""
    return (
        small.cpus <= big.cpus
        and small.mem_gb <= big.mem_gb
        and small.gpus <= big.gpus
        and (not small.gres or small.gres == big.gres)
    )


@dataclass
class PoolPlan:
    """One pool: ``workers`` tasks of one array, each with ``resources`` and ``time_min``."""

    name: str
    stages: list[str]
    resources: Resources
    workers: int
    cells: list[str] = field(default_factory=list)  # the cell ids it is submitted for, in plan order


def plan_pools(cells: dict, work: dict[str, list[int]], workers: int, time_min: int | None, resources_of):
    """The pools for the cells of ``work`` that can be pooled, and the rest (stage -> indices) for arrays.
    ``resources_of(stage, dataset)``: a stage's resources with a dataset's overrides."""
    pools: dict[tuple, PoolPlan] = {}
    arrays: dict[str, list[int]] = {}
    for stage, indices in work.items():
        base = resources_of(stage, None)
        if not indices:
            continue
        if not poolable(base):
            arrays[stage] = list(indices)
            continue
        key = kind(base)
        pool = pools.setdefault(key, PoolPlan(name_of(base), [], dataclasses.replace(base, per_dataset={}), workers))
        if stage not in pool.stages:
            pool.stages.append(stage)
        for i in indices:
            r = resources_of(stage, plan.cell_dataset(cells[stage][i]))
            pool.resources = dataclasses.replace(
                pool.resources,
                cpus=max(pool.resources.cpus, r.cpus),
                mem_gb=max(pool.resources.mem_gb, r.mem_gb),
                time_min=max(pool.resources.time_min, r.time_min),
            )
            pool.cells.append(cells[stage][i].id)
    for pool in pools.values():
        longest = pool.resources.time_min
        pool.resources = dataclasses.replace(
            pool.resources,
            time_min=max(longest, time_min or DEFAULT_TIME_MIN),
            time_floor_min=0,
            array_parallelism=workers,
            max_requeues=0,
        )
    return list(pools.values()), arrays


# -- a worker ------------------------------------------------------------------------------------------------------


@dataclass
class Worker:
    """The callable each task of a pool runs: take ready cells until none is left (module docstring)."""

    run_root: str
    pool: str
    cells: list[str]  # this pool's cells, taken first
    others: list[str]  # other pools' cells whose resources fit in this worker's, taken when none of its own is
    minutes: dict[str, float]  # cell id -> its time_min (the estimate before one was seen)
    cpus: dict[str, int]  # cell id -> its CPUs: its intra-op threads, as in a task of its own
    max_retries: dict[str, int]  # stage -> its max_retries
    time_min: float  # this worker's time limit
    since: float  # when the pool was submitted: a cell that failed before is tried again
    nodes: list[str] | None = None  # the partition's nodes (sinfo), None where unknown
    idle_min: float = DEFAULT_IDLE_MIN
    poll_s: float = 2.0

    def __call__(self) -> int:
        run_root = Path(self.run_root)
        key = job_key()
        if key is not None:
            (run_root / REQUEUE_DIR / key).unlink(missing_ok=True)  # left by this task's previous run
        deadline = time.monotonic() + self.time_min * 60 - MARGIN_S
        state = _State(run_root, self)
        status = Status(run_root, self.pool)
        try:
            return self._loop(state, status, deadline)
        finally:
            status.end()

    def _loop(self, state: "_State", status: "Status", deadline: float) -> int:
        idle_since, poll = None, self.poll_s
        while True:
            cell, waiting = state.next_cell(deadline - time.monotonic())
            if cell is None:
                if waiting == "no time":  # cells open, none fits in what is left: a fresh time limit
                    self.request_requeue()
                    return EXIT_REQUEUE
                if waiting == "nothing":
                    return 0
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > self.idle_min * 60:
                    print(f"histokt pool: idle {self.idle_min:g} min; leaving the rest to others", file=sys.stderr)
                    return 0
                status.write(None)
                time.sleep(poll)
                poll = min(poll * 1.5, 60.0)
                continue
            idle_since, poll = None, self.poll_s
            status.write(cell)
            code = state.run(cell)
            if code == EXIT_REQUEUE:  # preempted or at the time limit: the cell checkpointed
                self.request_requeue()
                return EXIT_REQUEUE

    def request_requeue(self) -> None:
        key = job_key()
        if key is not None:
            atomic.write_bytes(Path(self.run_root) / REQUEUE_DIR / key, b"")

    def checkpoint(self, *args, **kwargs):
        """submitit's USR2 handler outside a training loop (between cells, or in a cell that is not a
        training run): ask the host to requeue this worker; submitit ends it."""
        self.request_requeue()
        return None


class _State:
    """What a worker knows of the run root: cells done (never undone), dead, and how long cells took."""

    def __init__(self, run_root: Path, worker: Worker):
        self.run_root, self.worker = run_root, worker
        self.cells = plan.read(run_root)
        self.inputs = Inputs(run_root, self.cells)
        self.by_id = self.inputs.by_id
        self.index = {c.id: (stage, i) for stage, cs in self.cells.items() for i, c in enumerate(cs)}
        self.done: set[str] = set()
        self.dead: set[str] = set()
        self.looked: set[str] = set()
        self.alive: set[str] = set()
        self.crashes: dict[str, int] = {}  # cell id -> crashes in this worker
        self.seen: dict[tuple, float] = {}  # (stage, dataset) -> the longest a cell of them took here
        self.needs = {c: self._needs(c) for c in [*worker.cells, *worker.others]}
        count: dict[str, int] = {}
        for n in self.needs.values():
            for p in n:
                count[p] = count.get(p, 0) + 1
        order = {c: k for k, c in enumerate(self.by_id)}
        rank = {c: (-count.get(c, 0), order[c]) for c in self.needs}
        self.mine = sorted(worker.cells, key=rank.__getitem__)
        self.theirs = sorted(worker.others, key=rank.__getitem__)

    def _needs(self, cell_id: str) -> set[str]:
        cell = self.by_id[cell_id]
        if cell.kind == "collect":  # it reads every cell: it runs once all others are done or dead
            return {c for c, x in self.by_id.items() if x.kind != "collect"}
        return self.inputs.needs(cell)

    def is_done(self, cell_id: str) -> bool:
        if cell_id in self.done:
            return True
        if cell_id in self.looked:  # not done a moment ago, in this scan
            return False
        self.looked.add(cell_id)
        cell = self.by_id[cell_id]
        marker = plan.marker(self.run_root, cell)
        if cell.kind == "collect":  # a summary written before this pool is stale: the collector runs again
            done = marker.exists() and marker.stat().st_mtime >= self.worker.since
        else:
            done = plan.is_done(self.run_root, cell)
        if done:
            self.done.add(cell_id)
        return done

    def failed_for_good(self, cell_id: str, state: dict | None = None) -> bool:
        """Failed or blocked since the pool was submitted, and not to be retried (``state``: its state.json,
        where the caller has read it)."""
        if cell_id in self.dead:
            return True
        if cell_id in self.alive:  # not failed a moment ago, in this scan
            return False
        if state is None:
            state = atomic.read_json(plan.cell_dir(self.run_root, self.by_id[cell_id]) / "state.json") or {}
        if retry.failed_for_good(state) and state.get("time", 0) >= self.worker.since:
            self.dead.add(cell_id)
            return True
        self.alive.add(cell_id)
        return False

    def next_cell(self, time_left: float) -> tuple[str | None, str]:
        """(the cell to run, "") or (None, why): "no time" (cells ready, none fits in the time left), "wait"
        (cells whose inputs are still to come), "nothing" (every cell done, dead or held by others)."""
        wait = no_time = False
        self.looked, self.alive = set(), set()  # what this scan found not done, not failed: asked once each
        for group in (self.mine, self.theirs):
            for c in group:
                verdict = self._verdict(c, time_left)
                if verdict == "run":
                    return c, ""
                wait |= verdict == "wait"
                no_time |= verdict == "no time"
            if wait or no_time:  # cells of its own pool still to run: not yet another pool's
                break
        return None, "no time" if no_time else "wait" if wait else "nothing"

    def _verdict(self, c: str, time_left: float) -> str:
        """run, done, dead, wait (inputs to come), busy (held elsewhere, or crashed on this node) or no time."""
        if self.is_done(c) or c in self.dead:
            return "done"
        collect = self.by_id[c].kind == "collect"
        pending = [p for p in self.needs[c] if not self.is_done(p)]
        blocker = next((p for p in pending if self.failed_for_good(p)), None)
        if blocker is not None and not collect:
            record_blocked(self.run_root, self.by_id[c], self.by_id[blocker])
            self.dead.add(c)
            return "dead"
        if any(not self.failed_for_good(p) for p in pending):
            return "wait"
        if not self._takeable(c):
            return "busy"
        return "no time" if self.estimate(c) > time_left else "run"

    def _takeable(self, c: str) -> bool:
        """Nobody else holds it, it has not failed for good, and it did not crash on this node (where the
        partition has another)."""
        directory = plan.cell_dir(self.run_root, self.by_id[c])
        if lease.live(directory / LEASE) is not None:
            return False
        state = atomic.read_json(directory / "state.json") or {}
        if self.failed_for_good(c, state):
            return False
        crashed = retry.crashed_on(state)
        if retry.wanted(state) and retry.node() in crashed:
            nodes = self.worker.nodes
            return nodes is not None and not set(nodes) - set(crashed)  # the only nodes there are
        return True

    def estimate(self, c: str) -> float:
        cell = self.by_id[c]
        seen = self.seen.get((cell.stage, plan.cell_dataset(cell)))
        return seen * SAFETY if seen is not None else self.worker.minutes.get(c, 60.0) * 60

    def run(self, c: str) -> int:
        """Run one cell here; its exit code (75: interrupted, the worker must go). A failure is the cell's."""
        stage, i = self.index[c]
        cell = self.by_id[c]
        os.environ["HISTOKT_MAX_RETRIES"] = str(self.worker.max_retries.get(stage, retry.DEFAULT_MAX_RETRIES))
        threads(self.worker.cpus.get(c))
        t0 = time.monotonic()
        try:
            code = run_cell(self.run_root, stage, i, self.cells)
        except CellBusy:
            return 0
        except CellBlocked:
            self.dead.add(c)
            return 0
        except UserError as exc:
            print(f"histokt pool: {c}: {exc}", file=sys.stderr, flush=True)
            self.dead.add(c)
            return 0
        except Exception as exc:  # a crash, recorded by the cell (retry): never the end of the worker
            print(f"histokt pool: {c}: crashed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            # bounded here too, should the crash come before the cell could record it
            self.crashes[c] = self.crashes.get(c, 0) + 1
            if self.crashes[c] > self.worker.max_retries.get(stage, retry.DEFAULT_MAX_RETRIES):
                self.dead.add(c)
            return 0
        if code == 0:
            key = (cell.stage, plan.cell_dataset(cell))
            self.seen[key] = max(self.seen.get(key, 0.0), time.monotonic() - t0)
            self.done.add(c)
        return code


def threads(cpus: int | None) -> None:
    """A cell's intra-op threads: its own CPUs, not the worker's (the largest of its pool): a cell's float
    arithmetic, and so its result, is the same as in a task of its own (OMP_NUM_THREADS=its cpus)."""
    if not cpus:
        return
    os.environ["OMP_NUM_THREADS"] = str(cpus)  # read by a torch imported later in this process
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(cpus)


class Status:
    """``RUN_ROOT/pool/<worker>.json``: the worker's job, host, pid and the cell it runs (histokt status)."""

    def __init__(self, run_root: Path, pool: str):
        self.key = job_key() or f"local-{os.getpid()}"
        self.path = run_root / POOL_DIR / f"{self.key}.json"
        self.pool = pool
        self.cell: str | None = None
        self.ran = 0

    def write(self, cell: str | None, ended: bool = False) -> None:
        if cell is None and self.cell is None and self.path.exists() and not ended:
            return  # idle, and said so already
        if self.cell is not None and cell != self.cell:
            self.ran += 1
        self.cell = cell
        doc = {"worker": self.key, "pool": self.pool, "host": retry.node(), "pid": os.getpid(), "ran": self.ran}
        atomic.write_json(self.path, {**doc, "cell": cell, "time": time.time(), "ended": ended})

    def end(self) -> None:
        self.write(None, ended=True)


def workers(run_root) -> list[dict]:
    """What each worker of the study said last (``RUN_ROOT/pool/*.json``), by worker."""
    folder = Path(run_root) / POOL_DIR
    if not folder.is_dir():
        return []
    out = [atomic.read_json(p) for p in sorted(folder.glob("*.json"))]
    return [w for w in out if isinstance(w, dict)]
