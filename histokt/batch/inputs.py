"""Which cells a cell reads from, and whether one of them has failed for good: what decides when a cell may
run (a sweep's waves and dependencies, a pool worker's next cell) and when it never will (blocked)."""

from pathlib import Path

from histokt import atomic
from histokt.batch import retry
from histokt.study import plan


class Inputs:
    """Which cells a cell reads from (the cells that write its input files: its dataset's standardize cells,
    its model's cell), and whether such a cell has failed or is blocked (its state.json says so)."""

    def __init__(self, run_root: Path, cells: dict):
        self.run_root = run_root
        self.by_id = {c.id: c for cs in cells.values() for c in cs}
        self.producer = {d: c.id for d, c in plan.writers(run_root, cells).items()}
        self.dead: set[str] = set()  # blocked by this sweep, or given up on by this watch

    def needs(self, cell: plan.Cell) -> set[str]:
        parents = {Path(plan.fill_run_root(p, self.run_root)).parent for p in cell.inputs}
        return {self.producer[d] for d in parents if d in self.producer}

    def is_dead(self, cell_id: str) -> bool:
        if cell_id in self.dead:
            return True
        state = atomic.read_json(plan.cell_dir(self.run_root, self.by_id[cell_id]) / "state.json") or {}
        return retry.failed_for_good(state)  # a cell to be retried is not dead

    def done(self) -> set[str]:
        return {i for i, c in self.by_id.items() if plan.is_done(self.run_root, c)}


def record_blocked(run_root: Path, cell: plan.Cell, by: plan.Cell) -> None:
    """state.json of a cell that will not run because ``by``, a cell it reads from, failed or is blocked (the
    file is left alone where it says so already: a watch records thousands of such cells on every pass)."""
    directory = plan.cell_dir(run_root, cell)
    state = atomic.read_json(directory / "state.json") or {"attempts": 0}
    blocker = f"{by.stage}/{by.id}"
    if state.get("status") == "blocked" and state.get("blocked_by") == blocker:
        return
    directory.mkdir(parents=True, exist_ok=True)
    state.update(status="blocked", blocked_by=blocker, error=f"input cell {blocker} failed or is blocked")
    atomic.write_json(directory / "state.json", state)
