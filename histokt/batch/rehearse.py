"""A rehearsal: a study's whole plan through the real scheduler, by cells that do no work.

``histokt sweep SPEC --rehearse`` plans the spec into its own run root (``<run_root>-rehearsal`` unless
``--run-root``) marked by ``RUN_ROOT/rehearsal.json``. Every cell of that run root goes through the same path
as a real one (submission, waves, dependencies, lease, inputs checked, blocked or failed recorded, exit
code), then, instead of its work, writes the files later cells read from it (empty) and its done marker
(``{"rehearsal": true}``). So waves, dependencies and failure handling are checked at full size in minutes,
before a GPU-hour is spent. What a rehearsal checks of the inputs:

- a standardize cell fails, as the real one would, where its raw folder is absent;
- ``--rehearse-fail GLOB[,GLOB]``: the cells whose id matches fail (a user error, exit 2), to see what a
  study does when they do (which cells are blocked, what the watcher cancels);
- ``--rehearse-crash GLOB[:N][,...]``: the cells whose id matches crash (an exception, exit 1), on their first
  N tries only where N is given: a transient failure, to see the retries (``histokt.batch.retry``) at work.

A rehearsal's run root is never mixed with a real one: a real sweep refuses a run root holding
``rehearsal.json``, and a rehearsal refuses a run root planned for real.
"""

from fnmatch import fnmatch
from pathlib import Path

from histokt import atomic
from histokt.errors import UserError
from histokt.study import plan

MARKER = "rehearsal.json"


def settings(run_root) -> dict | None:
    """The rehearsal settings of a run root (``{"fail": [glob, ...]}``), or None for a real study's."""
    return atomic.read_json(Path(run_root) / MARKER)


def claim(run_root: Path, rehearse: bool, fail: list[str], crash: list[str] = ()) -> None:  # type: ignore[assignment]
    """Make ``run_root`` a rehearsal's (writing its settings) or check it is a real study's; a UserError
    where the run root is already the other kind. Written before the plan, so a plan is never unmarked."""
    planned = (run_root / "plan.json").exists()
    marked = (run_root / MARKER).exists()
    if rehearse and planned and not marked:
        raise UserError(f"{run_root}: holds a real study; a rehearsal needs a run root of its own (--run-root)")
    if not rehearse and marked:
        raise UserError(
            f"{run_root}: is a rehearsal's run root (its cells did no work); give the real study another "
            f"run_root, or remove {run_root} first"
        )
    if rehearse:
        run_root.mkdir(parents=True, exist_ok=True)
        atomic.write_json(run_root / MARKER, {"fail": fail, "crash": list(crash)})


def run(run_root, cells: dict[str, list[plan.Cell]], cell: plan.Cell, rules: dict) -> None:
    """The rehearsal of one cell whose inputs exist: fail where the real cell would (or where planted),
    else write what later cells read from it, then its done marker."""
    if cell.kind == "standardize" and not Path(cell.args["raw"]).is_dir():
        raise UserError(f"--raw {cell.args['raw']}: no such folder (point it at the dataset as downloaded)")
    planted = [g for g in rules.get("fail", []) if fnmatch(cell.id, g)]
    if planted:
        raise UserError(f"rehearsal: cell {cell.id} fails as planted (--rehearse-fail {planted[0]})")
    tries = (atomic.read_json(plan.cell_dir(run_root, cell) / "state.json") or {}).get("attempts", 1)
    for rule in rules.get("crash", []):
        glob, n = crash_rule(rule)
        if fnmatch(cell.id, glob) and (n is None or tries <= n):
            raise RuntimeError(f"rehearsal: cell {cell.id} crashes as planted on try {tries} (--rehearse-crash {rule})")
    root = Path(run_root).absolute()
    directory = plan.cell_dir(root, cell)
    for path in outputs(root, cells, directory):
        atomic.write_bytes(path, b"")
    report: dict[str, object] = {"rehearsal": True}
    if cell.kind == "collect":
        report["cells"] = tally(root, cells)
    atomic.write_json(plan.marker(root, cell), report)


def crash_rule(rule: str) -> tuple[str, int | None]:
    """(glob, N) of a --rehearse-crash rule ``GLOB:N`` (None for a plain ``GLOB``: every try crashes)."""
    if ":" not in rule:
        return rule, None
    glob, _, n = rule.rpartition(":")
    if not (glob and n.isdigit() and int(n) >= 1):
        raise UserError(f"--rehearse-crash {rule}: expected GLOB or GLOB:N with N a number of tries >= 1")
    return glob, int(n)


def outputs(run_root: Path, cells: dict[str, list[plan.Cell]], directory: Path) -> list[Path]:
    """The files in ``directory`` that some cell of the plan reads (a model, a merged model)."""
    # a substring test on the inputs as planned first: thousands of cells, each filled in only where it may match
    token = f"{{run_root}}/{directory.relative_to(run_root)}/" if directory.is_relative_to(run_root) else "\0"
    here = f"{directory}/"
    maybe = [p for cs in cells.values() for c in cs for p in c.inputs if p.startswith((token, here))]
    wanted = {Path(p) for p in plan.fill_run_root(maybe, run_root)}
    return sorted(p for p in wanted if p.parent == directory and p.name != "done.json")


def tally(run_root: Path, cells: dict[str, list[plan.Cell]]) -> dict[str, dict[str, int]]:
    """{stage: {done, failed, blocked, other: count}}: what the collector of a rehearsal reports."""
    out: dict[str, dict[str, int]] = {}
    for stage, members in cells.items():
        if stage == "collect":
            continue
        counts = out.setdefault(stage, {"done": 0, "failed": 0, "blocked": 0, "other": 0})
        for c in members:
            if plan.is_done(run_root, c):
                counts["done"] += 1
                continue
            state = (atomic.read_json(plan.cell_dir(run_root, c) / "state.json") or {}).get("status")
            counts[state if state in ("failed", "blocked") else "other"] += 1
    return out
