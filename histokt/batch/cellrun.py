"""Running one cell of a plan: `histokt run-cell RUN_ROOT --stage S --index I`, and the submitit job around it.

A cell checks its own inputs (a sweep makes it wait for its input cells with `afterany`, never `afterok`),
records its state in ``state.json`` (running, failed with the last error line, blocked by an input cell,
interrupted = checkpointed and waiting to be requeued) and ends with its done marker (a train cell's
``result.json``, else ``done.json``).

One writer per cell: a cell runs only while its job holds the cell's lease, ``CELL/cell.lease``
(histokt.lease: host, pid, job, heartbeat; it beats while the cell runs and is released at the end, also
after a failure or an interruption). The lease belongs to the job, not to one process:

- a ``--nproc K`` launch: the process running the cell holds it; the K ranks it spawns never look at it;
- a SLURM job step of K tasks (one DDP rank each, all running this function): rank 0 takes the lease; every
  other rank waits until the lease names its own job (``lease.current_job()``: the same for every task of
  the step), and gives up like rank 0 where another live process holds it, so no rank of a refused job is
  left waiting for a rank 0 that has gone. A rank outside SLURM (torchrun by hand) has no job to compare
  and trusts its launcher's rank 0.

Any other process on the cell (another job, a second `histokt run-cell` by hand) exits at once with
EXIT_BUSY, touching nothing (no state.json, no training), and says who holds it: "CELL: in use by host h,
pid p, job j, 12 s ago". A stale lease (a dead pid of this host, another host's heartbeat older than the
stale age, or this very job's lease from an earlier run of the job before a requeue) is taken over.

Exit codes, the same from `histokt run-cell` and from the submitit job (whose process exits with them, so
SLURM records a failed cell as FAILED, not COMPLETED):

    0   done (or done already)                     3   busy: another live process runs this cell (EXIT_BUSY)
    1   crash (a traceback in the log)             4   blocked: an input cell failed or has not finished
    2   user error (one line: what to fix)         75  interrupted: checkpointed, to be requeued (EXIT_REQUEUE)

Preemption: SLURM sends USR2; the training loop checkpoints and the cell returns "interrupted". Inside a
job the cell then leaves a marker ``RUN_ROOT/.requeue/<array job>_<task>``, and the batch script's
teardown, on the host where ``scontrol`` exists, requeues that one task. So it also works when Python runs
in a container without SLURM's tools (docs/cluster.md §1.9, option b).
"""

import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from histokt import atomic, lease, provenance
from histokt.batch import rehearse, retry
from histokt.batch.slurm import REQUEUE_DIR, is_rank0, job_key, step_tasks
from histokt.errors import EXIT_BLOCKED, EXIT_BUSY, EXIT_REQUEUE, UserError, full_disk
from histokt.study import plan, versions
from histokt.train.signals import StopRequested

LEASE = "cell.lease"
# An input cell failed or has not finished: not this cell's fault and nothing a rerun of it alone can fix,
# so neither a user error (2) nor a crash (1). state.json names the input cell ("blocked_by").
# how long a rank other than 0 of a SLURM step waits for its rank 0 to take the cell's lease
JOIN_TIMEOUT_S = 180.0
POLL_S = 0.2


class CellBusy(UserError):
    """Another live process holds the cell's lease; nothing was touched."""

    exit_code = EXIT_BUSY


class CellBlocked(UserError):
    """An input cell failed or has not finished; state.json says which (``blocked_by``)."""

    exit_code = EXIT_BLOCKED


def set_state(directory: Path, **fields) -> None:
    if not is_rank0():
        return
    state = atomic.read_json(directory / "state.json") or {"attempts": 0}
    # where it ran: the host, and the image where Apptainer runs it (histokt.provenance)
    image = provenance.container()
    where = {"host": socket.gethostname(), "container": image["image"] if image else None}
    state.update(fields, **where, pid=os.getpid(), job=lease.current_job(), time=time.time())
    atomic.write_json(directory / "state.json", state)


def run_cell(run_root, stage: str, index: int, cells: dict[str, list[plan.Cell]] | None = None) -> int:
    """Run (or resume) one cell; returns 0 (done) or 75 (interrupted), raises UserError (its ``exit_code``:
    2, CellBusy 3, CellBlocked 4) or any other exception (a crash). ``cells``: the plan, where the caller has
    read it already (a pool worker runs thousands of cells from one reading)."""
    cells = plan.read(run_root) if cells is None else cells
    members = cells.get(stage)
    if members is None:
        raise UserError(f"{run_root}: the plan has no stage {stage!r}")
    if not 0 <= index < len(members):
        raise UserError(f"{run_root}: stage {stage} has {len(members)} cells; --index {index} is out of range")
    cell = members[index]
    directory = plan.cell_dir(run_root, cell)
    if _done(run_root, cell):
        return 0
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LEASE
    if not is_rank0():
        if lease.current_job() is not None and _join(path, run_root, cells, cell):
            return 0
        return _run(run_root, cells, cell, directory)
    held = _acquire(path, directory)
    try:
        if _done(run_root, cell):  # finished by the holder we just followed
            return 0
        with held.beating():
            return _run(run_root, cells, cell, directory)
    finally:
        held.release()


def _done(run_root, cell: plan.Cell) -> bool:
    return plan.is_done(run_root, cell) and cell.kind != "collect"  # the collector re-reads every time


def _acquire(path: Path, directory: Path) -> lease.Lease:
    """The cell's lease for this job, or CellBusy naming the live holder."""
    for _ in range(2):  # a lease released between our try and our read of its holder: try once more
        held = lease.Lease.acquire(path, one_per_job=True)
        if held is not None:
            return held
        holder = lease.read(path)
        if holder is not None:
            raise CellBusy(f"{directory}: in use by {holder.describe()}")
    raise CellBusy(f"{directory}: in use (its lease was taken by others twice while we tried)")


def _join(path: Path, run_root, cells: dict[str, list[plan.Cell]], cell: plan.Cell) -> bool:
    """A rank other than 0 of a SLURM step: wait until the lease names this job (rank 0 holds it for us).
    True where the cell got done meanwhile; CellBusy where another live process holds it; False also where
    the cell is blocked (rank 0 found that too, and has released the lease: the caller says so)."""
    job = lease.current_job()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while True:
        holder = lease.read(path)
        if holder is not None and holder.job == job:
            return False
        if holder is not None and not lease.is_stale(path):
            raise CellBusy(f"{path.parent}: in use by {holder.describe()}")
        if _done(run_root, cell):
            return True
        if _blocker(run_root, cells, cell) is not None:
            return False
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: rank 0 of job {job} did not take the cell's lease in {JOIN_TIMEOUT_S:.0f} s")
        time.sleep(POLL_S)


def _run(run_root, cells: dict[str, list[plan.Cell]], cell: plan.Cell, directory: Path) -> int:
    """The cell's work, under its lease: inputs, state.json, the command."""
    blocked = _blocker(run_root, cells, cell)
    if blocked is not None:
        message, by = blocked
        set_state(directory, status="blocked", error=message, blocked_by=by)
        raise CellBlocked(message)
    state = atomic.read_json(directory / "state.json") or {}
    set_state(directory, status="running", attempts=state.get("attempts", 0) + 1, error=None, blocked_by=None)
    try:
        versions.check_cell(run_root, str(directory))  # a requeue into a rebuilt image, a changed checkout
        rules = rehearse.settings(run_root)
        if rules is None:
            code = _execute(run_root, cell, directory)
        else:  # a rehearsal: the same path, no work (histokt.batch.rehearse)
            rehearse.run(run_root, cells, cell, rules)
            code = 0
    except UserError as exc:
        set_state(directory, status="failed", error=str(exc), crashed=False, retry=False)
        raise
    except BaseException as exc:
        line = traceback.format_exception_only(type(exc), exc)[-1].strip()
        if type(exc).__name__ == "UncompletedJobError":  # submitit's USR2/TERM handler, outside a training loop
            set_state(directory, status="interrupted", error=line)
        elif isinstance(exc, Exception):  # a crash: recorded, for a bounded retry (histokt.batch.retry)
            tried = [*retry.failures(state), retry.crash_record(line, lease.current_job())]
            retrying = len(tried) <= retry.max_retries()
            set_state(directory, status="failed", error=line, crashed=True, failures=tried, retry=retrying)
        else:
            set_state(directory, status="failed", error=line, crashed=False, retry=False)
        raise
    set_state(directory, status="interrupted" if code == EXIT_REQUEUE else "done")
    return code


def _blocker(run_root, cells: dict[str, list[plan.Cell]], cell: plan.Cell) -> tuple[str, str | None] | None:
    """(message, "stage/cell id" of the input cell) for the first input file that is missing, else None."""
    missing = [Path(p) for p in plan.fill_run_root(cell.inputs, run_root) if not Path(p).exists()]
    if not missing:
        return None
    root = Path(run_root).absolute()
    owner = plan.writers(root, cells).get(missing[0].parent)
    if owner is None:
        return f"input missing: {missing[0]} (no cell of the plan writes it)", None
    by = f"{owner.stage}/{owner.id}"
    theirs = atomic.read_json(plan.cell_dir(root, owner) / "state.json") or {}
    if theirs.get("status") == "failed":
        why = f"failed: {theirs.get('error')}"
    elif theirs.get("status") == "blocked":
        why = f"blocked by {theirs.get('blocked_by')}"
    elif plan.is_done(root, owner):
        why = f"done without writing {missing[0].name}"
    else:
        why = "not finished"
    return f"input missing: {missing[0]} (input cell {by} {why})", by


def _execute(run_root, cell: plan.Cell, directory: Path) -> int:
    args = {k: plan.fill_run_root(v, run_root) for k, v in cell.args.items()}
    if cell.kind == "standardize":
        from histokt.ingest.standardize import StandardizeConfig, standardize

        summary = standardize(StandardizeConfig(**args))
        atomic.write_json(directory / "done.json", summary.to_json())
        return 0
    if cell.kind == "train":
        from histokt.train.launch import TrainConfig, train

        outcome = train(TrainConfig(**{"progress": False, **args, "out": directory}))
        if not outcome.interrupted:
            return 0
        # where each preemption caught the cell: kept across attempts, for `histokt status` and post-mortems
        history = (atomic.read_json(directory / "state.json") or {}).get("interrupted_at_steps", [])
        set_state(directory, interrupted_at_steps=[*history, outcome.step])
        return EXIT_REQUEUE
    if cell.kind == "merge":
        from histokt.distill.merge import DistillConfig, distill

        merged = distill(
            DistillConfig(
                sources=[Path(p) for p in args["sources"]],
                rule=args["rule"],
                lowrank=args["lowrank"],
                out=directory / "merged.pt",
                # a merge cell planned before the search was named ran the reference's: it still does
                evbmf_search=args.get("evbmf_search", "reference"),
            )
        )
        atomic.write_json(directory / "done.json", merged)
        return 0
    if cell.kind == "collect":
        from histokt.results.collect import collect

        collected = collect(run_root)
        atomic.write_json(directory / "done.json", collected)
        return 0
    raise UserError(f"unknown cell kind {cell.kind!r}")


def leave(code: int) -> NoReturn:
    """End the task's process with ``code``. A rank of a multi-task step leaves at once: Python's shutdown puts
    the default SIGTERM action back while it unloads torch, and the SIGTERM srun sends once another rank has
    ended would turn this rank's code into 143 (every file it wrote is already renamed into place)."""
    if step_tasks() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


@dataclass
class CellTask:
    """The callable submitit runs in a job: one cell. Small and importable, so it pickles cleanly."""

    run_root: str
    stage: str
    index: int

    def __call__(self) -> int:
        """Run the cell. Every end but "done" leaves the task's process with the cell's exit code (the table
        in the module docstring): a SystemExit passes through submitit's ``process_job``, which catches
        Exception only (writing no result pickle: nothing reads them, docs/cluster.md blocker 8). A crash
        is left to submitit: it saves the traceback as the task's result and re-raises, so Python exits 1."""
        if step_tasks() > 1:
            # a rank of a multi-task step: once another rank has ended, srun (--kill-on-bad-exit) sends SIGTERM
            # to the others, which must not cut short rank 0's checkpoint, state.json or requeue marker; kept
            # until the process exits (the training loop's own handlers nest inside, and start stopped where a
            # signal came before it)
            StopRequested().install()
        return self._run()

    def _run(self) -> int:
        self.clear_requeue_request()
        try:
            code = run_cell(self.run_root, self.stage, self.index)
        except UserError as exc:
            self._exit(exc)
        except OSError as exc:  # a full disk or an exceeded quota: the user's to fix, as `histokt run-cell` says
            error = full_disk(exc)
            if error is None:
                self.retry_after_crash()
                raise
            self._exit(error)
        except Exception:
            self.retry_after_crash()
            raise
        if code == EXIT_REQUEUE:
            self.request_requeue()
            leave(EXIT_REQUEUE)
        return code

    @staticmethod
    def _exit(error: UserError) -> NoReturn:
        print(f"histokt run-cell: error: {error}", file=sys.stderr, flush=True)
        leave(error.exit_code)

    def request_requeue(self) -> None:
        """Leave the marker the batch script's teardown requeues this task on, unless the task was requeued
        ``HISTOKT_MAX_REQUEUES`` times already (set from the stage's ``max_requeues``; unset: no cap)."""
        key = job_key()
        if key is None or not is_rank0():
            return
        cap, restarts = os.environ.get("HISTOKT_MAX_REQUEUES"), int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if cap and restarts >= int(cap):
            print(
                f"histokt run-cell: {self.stage}/{self.index}: checkpointed, but requeued {restarts} times already "
                f"(max_requeues {cap}): not requeued again; run the sweep again to resume it",
                file=sys.stderr,
                flush=True,
            )
            return
        atomic.write_bytes(Path(self.run_root) / REQUEUE_DIR / key, b"")

    def retry_after_crash(self) -> None:
        """A SLURM task whose cell crashed at most max_retries times: requeued by its batch script, as after a
        preemption (the sweep excludes the nodes it crashed on while it waits: histokt.batch.retry)."""
        key = job_key()
        if key is None or not is_rank0():
            return
        try:
            cell = plan.read(self.run_root)[self.stage][self.index]
        except (UserError, KeyError, IndexError):
            return
        state = atomic.read_json(plan.cell_dir(self.run_root, cell) / "state.json") or {}
        cap = retry.max_retries()
        n = len(retry.failures(state))
        if not retry.wanted(state):
            print(f"histokt run-cell: {cell.id}: crashed {n} time(s), max_retries {cap}: not retried", file=sys.stderr)
            return
        print(f"histokt run-cell: {cell.id}: crashed ({n} of at most {cap + 1} tries): requeued", file=sys.stderr)
        atomic.write_bytes(Path(self.run_root) / REQUEUE_DIR / key, b"")

    def clear_requeue_request(self) -> None:
        """A marker left by this task's previous run, requeued by SLURM itself before its teardown ran (a
        node failure, a preemption): gone, or the teardown of this run would requeue it once more."""
        key = job_key()
        if key is not None and is_rank0():
            (Path(self.run_root) / REQUEUE_DIR / key).unlink(missing_ok=True)

    def checkpoint(self, *args, **kwargs):
        """submitit's USR2 handler, outside a training loop: ask the host to requeue, let this task end."""
        self.request_requeue()
        return None
