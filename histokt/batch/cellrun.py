"""Running one cell of a plan: `histokt run-cell RUN_ROOT --stage S --index I`, and the submitit job around it.

A cell checks its own inputs (sweeps chain stages with `afterany`, never `afterok`), records its state in
``state.json`` (running, failed with the last error line, interrupted = checkpointed and waiting to be
requeued) and ends with its done marker (a train cell's ``result.json``, else ``done.json``).

Preemption: SLURM sends USR2; the training loop checkpoints and the cell returns "interrupted". Inside a
job the cell then leaves a marker ``RUN_ROOT/.requeue/<array job>_<task>``, and the batch script's
teardown, on the host where ``scontrol`` exists, requeues that one task. So it also works when Python runs
in a container without SLURM's tools (docs/cluster.md §1.9, option b).
"""

import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from histokt import atomic
from histokt.batch.slurm import REQUEUE_DIR, is_rank0, job_key
from histokt.errors import EXIT_REQUEUE, UserError
from histokt.study import plan


def set_state(directory: Path, **fields) -> None:
    if not is_rank0():
        return
    state = atomic.read_json(directory / "state.json") or {"attempts": 0}
    state.update(fields, host=socket.gethostname(), pid=os.getpid(), job=job_key(), time=time.time())
    atomic.write_json(directory / "state.json", state)


def run_cell(run_root, stage: str, index: int) -> int:
    """Run (or resume) one cell; returns the process exit code (0 done, 75 interrupted, 2 bad input, 1 crash)."""
    cells = plan.read(run_root).get(stage)
    if cells is None:
        raise UserError(f"{run_root}: the plan has no stage {stage!r}")
    if not 0 <= index < len(cells):
        raise UserError(f"{run_root}: stage {stage} has {len(cells)} cells; --index {index} is out of range")
    cell = cells[index]
    directory = plan.cell_dir(run_root, cell)
    directory.mkdir(parents=True, exist_ok=True)
    if plan.is_done(run_root, cell) and cell.kind != "collect":  # the collector re-reads every time
        return 0
    state = atomic.read_json(directory / "state.json") or {}
    set_state(directory, status="running", attempts=state.get("attempts", 0) + 1, error=None)
    try:
        missing = [p for p in plan.fill_run_root(cell.inputs, run_root) if not Path(p).exists()]
        if missing:
            raise UserError(f"input missing: {missing[0]} (its cell failed or has not run yet)")
        code = _execute(run_root, cell, directory)
    except UserError as exc:
        set_state(directory, status="failed", error=str(exc))
        raise
    except BaseException as exc:
        line = traceback.format_exception_only(type(exc), exc)[-1].strip()
        set_state(directory, status="failed", error=line)
        raise
    set_state(directory, status="interrupted" if code == EXIT_REQUEUE else "done")
    return code


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


@dataclass
class CellTask:
    """The callable submitit runs in a job: one cell. Small and importable, so it pickles cleanly."""

    run_root: str
    stage: str
    index: int

    def __call__(self) -> int:
        try:
            code = run_cell(self.run_root, self.stage, self.index)
        except UserError as exc:
            print(f"histokt run-cell: error: {exc}", flush=True)
            return 2
        if code == EXIT_REQUEUE:
            self.request_requeue()
        return code

    def request_requeue(self) -> None:
        key = job_key()
        if key is not None and is_rank0():
            atomic.write_bytes(Path(self.run_root) / REQUEUE_DIR / key, b"")

    def checkpoint(self, *args, **kwargs):
        """submitit's USR2 handler, outside a training loop: ask the host to requeue, let this task end."""
        self.request_requeue()
        return None
