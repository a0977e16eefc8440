"""`histokt collect RUN_ROOT [--out DIR] [--compare-paper]`: a study's tables, matrices and heatmaps, offline.

Reads RUN_ROOT/plan.json and the training cells' result.json files, nothing else (no checkpoint, no pickle,
no submitit state; state.json only to say why a cell has no result). A missing, partial or corrupt file is
listed in the report and skipped, never a crash. Every file goes to RUN_ROOT/summary/ (or ``out``), each
written atomically, so collecting again (while cells still finish) is always safe and gives the same tables.

Files (top-1 as a fraction in transfer.csv, as the cells store it; in % everywhere else):

- ``transfer.csv``: one row per (init, mode, source, target, lr): n, mean best-validation top-1, mean test
  top-1 and its sample std (ddof=1, empty when n < 2). Stage-A cells are the rows with mode "scratch" and
  source == target. Distillation cells are in distill.csv instead.
- ``matrix_<init>_<mode>.{csv,md,tex,png}`` for every init family and mode (fine, deep) the plan has:
  rows = source, columns = target, cells "mean ± std" of the test top-1 over seeds; the diagonal is the
  target's own Stage-A training of that family (random: random init on the target; imagenet: ImageNet init
  on the target, i.e. ImageNet → target); plus each cell's gain over its target's diagonal, in points.
  Cells planned but without a result are "—" (hatched in the heatmap); cells never planned are blank.
- ``distill.csv``/``.md``: each merged model (source set, rule, lowrank, family) deep-tuned on a target,
  against ImageNet → target and against the best single source of that family (deep-tuned).
- ``report.md``: complete, missing, failed (with the error of state.json), running, corrupt.
- with ``compare_paper``: ``deviations.{md,csv}`` first (histokt.results.deviations: every way the study differs
  from the paper, from plan.json and the cells' result.json), then ``compare_<init>_deep.{csv,md}``, our deep
  matrix minus the published one (histokt.results.paper), over the datasets whose names equal the paper's card
  names, each labelled "like for like" or "differs in: …".

Learning-rate selection (docs/method.md §3, "the same LR for every source"): for a target (and init, mode), each LR
of the grid gets a validation score: for every source, the mean over seeds of the best validation top-1, then
the mean over the sources that have results at that LR (each source weighs the same whatever its seed count).
The LR with the highest score is the target's LR, ties going to the smaller LR, and the matrix shows every
source's test top-1 at that one LR. The choice is made over all transfer cells into the target (from every other
dataset), so a source never gets an LR picked for itself, and the test split never takes part in it. A cell
without a result at the chosen LR is missing ("—"), never filled from another LR. The diagonal (Stage A) and
each merged model of distill.csv choose among their own LRs the same way (Stage A usually has one). The "best
single source" of distill.csv is the deep matrix's best off-diagonal cell in that target's column by test mean,
as the paper reads its figures (docs/method.md §5.3, §5.4), ties going to the source first in the plan.
"""

import csv
import io
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from histokt import __version__, atomic
from histokt.errors import UserError
from histokt.result import CellResult, MalformedResult
from histokt.results import deviations, figures, paper
from histokt.results.deviations import Deviations
from histokt.results.matrix import MISSING, Matrix, Stat, diag_text, title
from histokt.study import plan, versions

COLUMNS = ["init", "mode", "source", "target", "lr", "n", "valid_top1_mean", "test_top1_mean", "test_top1_std"]
DISTILL_COLUMNS = [
    "family",
    "target",
    "sources",
    "rule",
    "lowrank",
    "lr",
    "n",
    "top1_pct_mean",
    "top1_pct_std",
    "imagenet_pct_mean",
    "imagenet_pct_std",
    "gain_vs_imagenet_pp",
    "best_source",
    "best_source_pct_mean",
    "best_source_pct_std",
    "gain_vs_best_source_pp",
]
COMPARE_COLUMNS = ["source", "target", "ours_mean", "ours_std", "paper_mean", "paper_std", "diff_pp"]
MODES = ("fine", "deep")
STATUSES = ("done", "running", "failed", "blocked", "corrupt", "missing")
LISTED = 100  # not-started cells listed by name in report.md; the rest are counted


class Scores(NamedTuple):
    """One finished cell: best validation top-1 and test top-1 (fractions)."""

    valid: float
    test: float


class RunKey(NamedTuple):
    """A group of seeds of one training cell (Stage A: mode "scratch" and source == target)."""

    family: str
    mode: str
    source: str
    target: str
    lr: float | None


class ModelKey(NamedTuple):
    """A merged model deep-tuned on a target: its source models ("a+b"), merge rule and lowrank ("true"/"false")."""

    family: str
    sources: str
    target: str
    rule: str
    lowrank: str


class MergedKey(NamedTuple):
    """A group of seeds of a merged model's cell at one LR."""

    model: ModelKey
    lr: float | None


class MatrixKey(NamedTuple):
    """One transfer matrix: init family and tuning mode."""

    family: str
    mode: str


Groups = Mapping[str, Sequence[Scores]]  # group (a source, or the one merged model) -> its seeds' scores


def read_result(path: Path) -> tuple[CellResult | None, str | None]:
    """(result, problem): the parsed result.json, or None and why it was skipped."""
    try:
        return CellResult.read(path), None
    except FileNotFoundError:
        return None, "missing"
    except MalformedResult as exc:
        return None, f"incomplete result.json ({exc})"
    except (OSError, ValueError) as exc:
        return None, f"corrupt result.json ({type(exc).__name__})"


def _scores(result: CellResult) -> Scores | None:
    """(best valid top-1, test top-1) of a result, or None where either is not a finite number."""
    pair = Scores(float(result.valid.top1_best), float(result.test["top1"]))
    return pair if all(math.isfinite(x) for x in pair) else None


@dataclass
class _Scan:
    """What the plan holds and what the cells report."""

    runs: dict[RunKey, list[Scores]] = field(default_factory=dict)
    merged: dict[MergedKey, list[Scores]] = field(default_factory=dict)
    pairs: dict[MatrixKey, set[tuple[str, str]]] = field(default_factory=dict)  # planned (source, target) transfers
    stage_a: dict[str, set[str]] = field(default_factory=dict)  # family -> {dataset} planned Stage-A cells
    models: dict[ModelKey, None] = field(default_factory=dict)  # merged models, in plan order
    order: dict[str, None] = field(default_factory=dict)  # datasets, in order of first appearance in the plan
    status: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {s: [] for s in STATUSES}
    )  # -> [{"cell", "stage", "why"}]
    stages: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> {status: count}
    runtimes: dict[str, dict[str, Any]] = field(default_factory=dict)  # done cell id -> its result.json runtime
    deviations: Deviations = field(default_factory=Deviations)  # of the cells a compared (deep) matrix reads


def _lr(value: Any) -> float | None:
    return None if value is None else float(value)


def _lr_key(lr: float | None) -> tuple[bool, float]:
    """Sort key of LRs: ascending, None (unknown) last."""
    return (lr is None, lr or 0.0)


def _role(stage: str, meta: dict) -> str:
    if stage == "distill" or "rule" in meta:
        return "distill"
    return "pretrain" if meta.get("mode") == "scratch" else "transfer"


def _state(directory: Path) -> dict:
    try:
        state = atomic.read_json(directory / "state.json")
    except (OSError, ValueError):
        return {"status": None, "error": "state.json unreadable"}
    return state if isinstance(state, dict) else {}


def _read_plan(run_root: Path) -> tuple[dict, dict]:
    """plan.json, read once: the document (study name, protocol, deviations) and its cells by stage."""
    try:
        doc = plan.read_doc(run_root)
        return doc, plan.cells_of(doc)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UserError(
            f"{run_root}/plan.json is corrupt ({type(exc).__name__}: {exc}); re-plan it with "
            f"'histokt sweep SPEC' (cells that are done are kept)"
        ) from None


def _scan(run_root: Path, cells: dict, deviations: Deviations) -> _Scan:
    scan = _Scan(deviations=deviations)
    for stage, members in cells.items():
        counts = scan.stages.setdefault(stage, dict.fromkeys(STATUSES, 0))
        for cell in members:
            if cell.kind != "train":
                continue
            status, why = _visit(scan, run_root, stage, cell)
            counts[status] += 1
            if status != "done":
                scan.status[status].append({"cell": cell.id, "stage": stage, "why": why})
            else:
                scan.status["done"].append({"cell": cell.id, "stage": stage, "why": None})
        if not any(counts.values()):
            del scan.stages[stage]
    return scan


def _visit(scan: _Scan, run_root: Path, stage: str, cell) -> tuple[str, str | None]:
    """Record one training cell: where it belongs in the tables and, if done, its scores."""
    m = cell.meta if isinstance(cell.meta, dict) else {}
    role = _role(stage, m)
    need = ("family", "source", "target") + (("rule",) if role == "distill" else ("mode",))
    if any(m.get(k) is None for k in need):
        return "corrupt", f"plan.json meta lacks {', '.join(k for k in need if m.get(k) is None)}"
    family, source, target = str(m["family"]), str(m["source"]), str(m["target"])
    model: ModelKey | None = None
    if role == "distill":
        model = ModelKey(family, source, target, str(m["rule"]), str(m.get("lowrank")).lower())
        scan.models.setdefault(model, None)
        scan.order.setdefault(target, None)
    else:
        scan.order.setdefault(source, None)
        scan.order.setdefault(target, None)
        if role == "pretrain":
            scan.stage_a.setdefault(family, set()).add(target)
        else:
            scan.pairs.setdefault(MatrixKey(family, str(m["mode"])), set()).add((source, target))
    directory = plan.cell_dir(run_root, cell)
    result, problem = read_result(directory / "result.json")
    if result is not None:
        scores = _scores(result)
        if scores is None:
            return "corrupt", "incomplete result.json (no finite valid top1_best / test top1)"
        lr = _lr(m["lr"] if m.get("lr") is not None else result.config.get("lr", cell.args.get("lr")))
        scan.runtimes[cell.id] = result.runtime
        if role == "pretrain" or (role == "transfer" and m["mode"] == "deep"):
            scan.deviations.add_cell(family, result.deviations)
        if model is not None:
            scan.merged.setdefault(MergedKey(model, lr), []).append(scores)
        else:
            scan.runs.setdefault(RunKey(family, str(m["mode"]), source, target, lr), []).append(scores)
        return "done", None
    if problem != "missing":
        return "corrupt", problem
    state = _state(directory)
    s = state.get("status")
    if s == "failed":
        return "failed", state.get("error") or "failed (no error recorded)"
    if s == "blocked":  # an input cell failed or is not done: the cell names it (exit 4, never trained)
        return "blocked", f"blocked by {state.get('blocked_by') or 'an input cell'}: {state.get('error', '')}".rstrip(
            ": "
        )
    if s in ("running", "interrupted"):
        return "running", "requeued after an interruption" if s == "interrupted" else "running"
    return "missing", state.get("error") or ("not started" if s is None else f"state {s!r}, no result.json")


def choose_lr(by_lr: Mapping[float | None, Groups]) -> float | None:
    """The LR whose mean (over groups) of the per-group mean best-validation top-1 is highest.

    ``by_lr``: {lr: {group: [(valid, test), ...]}}; a group is a source (or the one merged model). Ties go to
    the smaller LR (an unknown LR, None, comes after every known one), whatever the order of ``by_lr``. None
    where nothing has a result."""
    best, chosen = None, None
    for lr in sorted(by_lr, key=_lr_key):
        means = [statistics.fmean(v for v, _ in pairs) for pairs in by_lr[lr].values() if pairs]
        if means and (best is None or statistics.fmean(means) > best):
            best, chosen = statistics.fmean(means), lr
    return chosen


def _stage_a(scan: _Scan, family: str, dataset: str) -> Stat | None:
    by_lr: dict[float | None, dict[str, list[Scores]]] = {}
    for k, pairs in scan.runs.items():
        if k.family == family and k.mode == "scratch" and k.source == k.target == dataset:
            by_lr.setdefault(k.lr, {})[k.source] = pairs
    lr = choose_lr(by_lr)
    return None if lr is None else Stat.of(by_lr[lr][dataset])


def _matrix(scan: _Scan, init: str, mode: str) -> Matrix:
    pairs = scan.pairs[MatrixKey(init, mode)]
    sources, targets = {s for s, _ in pairs}, {t for _, t in pairs}
    rows = [d for d in scan.order if d in sources or d in targets]
    cols = [d for d in scan.order if d in targets]
    by_target: dict[str, dict[float | None, dict[str, list[Scores]]]] = {}
    for k, results in scan.runs.items():
        if k.family == init and k.mode == mode and k.source != k.target:
            by_target.setdefault(k.target, {}).setdefault(k.lr, {})[k.source] = results
    lrs = {t: choose_lr(by_target.get(t, {})) for t in cols}
    cells: dict[tuple[str, str], Stat | None] = {}
    for s in rows:  # plan order, so that every reading of the matrix is the same whatever the hash seed
        for t in cols:
            if s != t and (s, t) in pairs:
                lr = lrs[t]
                found = scan.runs.get(RunKey(init, mode, s, t, lr)) if lr is not None else None
                cells[(s, t)] = Stat.of(found) if found else None
    diag = {t: _stage_a(scan, init, t) for t in cols if t in scan.stage_a.get(init, ())}
    return Matrix(init, mode, rows, cols, lrs, cells, diag)


def collect(run_root, out=None, compare_paper: bool = False) -> dict:
    """Write the summary of a study (see the module docstring); returns counts and the files written."""
    started = time.perf_counter()
    run_root = Path(run_root)
    out = Path(out) if out else run_root / "summary"
    doc, cells = _read_plan(run_root)
    scan = _scan(run_root, cells, Deviations.of_plan(doc))
    groups = versions.by_version(scan.runtimes)
    mixed = _mixed_note(groups)
    files = {}
    rows = _transfer_rows(scan)
    files["transfer.csv"] = _csv(COLUMNS, rows)
    inits = sorted({k.family for k in scan.pairs})
    matrices = [_matrix(scan, init, mode) for init in inits for mode in MODES if MatrixKey(init, mode) in scan.pairs]
    for m in matrices:
        files[f"{m.name}.csv"] = _matrix_csv(m)
        files[f"{m.name}.md"] = _matrix_md(m) + (f"\n**{mixed}**\n" if mixed else "")
        files[f"{m.name}.tex"] = (f"% {mixed}\n" if mixed else "") + figures.matrix_tex(m)
    distill = _distill_rows(scan, {MatrixKey(m.init, m.mode): m for m in matrices})
    files["distill.csv"] = _csv(DISTILL_COLUMNS, [r.csv for r in distill])
    files["distill.md"] = _distill_md(distill) + (f"\n**{mixed}**\n" if mixed else "")
    deviation_text = ""
    if compare_paper:
        compared_families = [m.init for m in matrices if m.mode == "deep" and paper.MATRICES.get(m.init)]
        deviation_text = scan.deviations.markdown(compared_families)
        files["deviations.md"] = deviation_text
        files["deviations.csv"] = _csv(deviations.COLUMNS, scan.deviations.rows(compared_families))
        for m in matrices:
            if m.init in compared_families and m.mode == "deep":
                compared = _compare(m)
                files[f"compare_{m.init}_deep.csv"] = _csv(COMPARE_COLUMNS, [r[:7] for r in compared])
                files[f"compare_{m.init}_deep.md"] = _compare_md(m, compared, scan.deviations.label(m.init))
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        atomic.write_bytes(out / name, text.encode())
    for m in matrices:
        figures.heatmap(m, out / f"{m.name}.png")
    names = sorted([*files, *(f"{m.name}.png" for m in matrices), "report.md"])
    report = _report(doc, run_root, out, scan, matrices, distill, groups, time.perf_counter() - started)
    atomic.write_bytes(out / "report.md", report.encode())
    return {
        "rows": len(rows),
        **{k: len(v) for k, v in scan.status.items()},
        "matrices": [m.name for m in matrices],
        "files": names,
        "out": str(out),
        "deviations": deviation_text,
        "seconds": round(time.perf_counter() - started, 3),
    }


# ---- text tables ----------------------------------------------------------------------------------------------


def _num(x) -> str:
    """A number for a CSV: exact enough, without float noise (0.85, not 0.8500000000000001); '' for None."""
    if x is None:
        return ""
    if isinstance(x, float):
        return repr(round(x, 10))
    return str(x)


def _csv(columns, rows) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[_num(v) for v in row] for row in rows])
    return buf.getvalue()


def _transfer_rows(scan: _Scan) -> list[list[Any]]:
    mode_order = {"scratch": 0, "fine": 1, "deep": 2}
    keys = sorted(
        scan.runs,
        key=lambda k: (k.family, mode_order.get(k.mode, 3), k.mode, k.source, k.target, _lr_key(k.lr)),
    )
    out = []
    for key in keys:
        st = Stat.of(scan.runs[key])
        out.append([*key, st.n, st.valid, st.test, st.std])
    return out


def _pct(st: Stat | None) -> str:
    """'mean ± std' in %; 'mean (n=1)' for a single seed; '—' when missing."""
    if st is None:
        return MISSING
    return f"{100 * st.test:.2f} ± {100 * st.std:.2f}" if st.std is not None else f"{100 * st.test:.2f} (n={st.n})"


def _lr_text(lr) -> str:
    return MISSING if lr is None else plan.lr_name(lr)


def _signed(x) -> str:
    return "" if x is None else f"{x:+.2f}"


def _matrix_csv(m: Matrix) -> str:
    """Wide: one row per source ('mean ± std' in %, '—' missing, blank never planned), then the chosen LR of
    each target, then one 'gain <source>' row per source (points over the target's diagonal)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["source", *m.cols])
    for s in m.rows:
        w.writerow([s, *(_pct(st) if planned else "" for planned, st in (m.at(s, t) for t in m.cols))])
    w.writerow(["lr", *(_lr_text(m.lr[t]) for t in m.cols)])
    for s in m.rows:
        w.writerow([f"gain {s}", *(_signed(m.gain(s, t)) if s != t else "" for t in m.cols)])
    return buf.getvalue()


def _md_table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _matrix_md(m: Matrix) -> str:
    d = paper.display
    head = ["source \\ target", *map(d, m.cols)]
    top1 = []
    for s in m.rows:
        row = [f"**{d(s)}**"]
        for t in m.cols:
            planned, st = m.at(s, t)
            text = _pct(st) if planned else ""
            row.append(f"**{text}**" if s == t and st is not None else text)
        top1.append(row)
    top1.append(["LR", *(_lr_text(m.lr[t]) for t in m.cols)])
    gains = [
        [f"**{d(s)}**", *((_signed(m.gain(s, t)) or MISSING) if s != t and m.at(s, t)[0] else "" for t in m.cols)]
        for s in m.rows
    ]
    lines = [
        f"# {title(m)}: test top-1 (%)",
        "",
        f"Rows = source, columns = target; mean ± sample std over seeds. **Diagonal** = {diag_text(m.init)}. "
        "LR chosen per target on validation (the same for every source; row LR). "
        f"{MISSING} = planned, no result yet; blank = not planned.",
        "",
        *_md_table(head, top1),
        "",
        "## Gain over the target's diagonal (points)",
        "",
        *_md_table(head, gains),
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class DistillRow:
    """One merged model in distill.csv/.md: its results at its LR, ImageNet → target and the best single source."""

    csv: list[Any]
    model: ModelKey
    lr: float | None
    stat: Stat | None
    bar: Stat | None  # ImageNet -> target
    best_source: str | None
    best: Stat | None


def best_single_source(m: Matrix | None, target: str) -> tuple[str | None, Stat | None]:
    """The off-diagonal cell of ``target``'s column with the highest test mean; ties go to the first source in
    the matrix's row order (the plan's)."""
    best_source, best = None, None
    if m is None:
        return best_source, best
    for s in m.rows:
        cell = m.cells.get((s, target))
        if s != target and cell is not None and (best is None or cell.test > best.test):
            best_source, best = s, cell
    return best_source, best


def _distill_rows(scan: _Scan, matrices: Mapping[MatrixKey, Matrix]) -> list[DistillRow]:
    out = []
    order = {d: i for i, d in enumerate(scan.order)}
    for model in sorted(scan.models, key=lambda k: (order.get(k.target, 0), k.family, k.sources, k.rule, k.lowrank)):
        family, sources, target, rule, lowrank = model
        by_lr = {k.lr: {"merged": v} for k, v in scan.merged.items() if k.model == model}
        lr = choose_lr(by_lr)
        st = Stat.of(by_lr[lr]["merged"]) if lr is not None else None
        bar = _stage_a(scan, "imagenet", target)
        best_source, best = best_single_source(matrices.get(MatrixKey(family, "deep")), target)

        def pct(x: float | None) -> float | None:
            return None if x is None else 100 * x

        def diff(a: Stat | None, b: Stat | None) -> float | None:
            return None if a is None or b is None else 100 * (a.test - b.test)

        csv_row = [
            family,
            target,
            sources,
            rule,
            lowrank,
            lr,
            (st and st.n) or 0,
            pct(st.test if st else None),
            pct(st.std if st else None),
            pct(bar.test if bar else None),
            pct(bar.std if bar else None),
            diff(st, bar),
            best_source or "",
            pct(best.test if best else None),
            pct(best.std if best else None),
            diff(st, best),
        ]
        out.append(DistillRow(csv_row, model, lr, st, bar, best_source, best))
    return out


def _distill_md(rows: list[DistillRow]) -> str:
    lines = [
        "# Weight distillation: merged models deep-tuned on a target, test top-1 (%)",
        "",
        "Each merged model at its LR chosen on validation, against ImageNet → target (the bar of docs/method.md "
        "§5.4) and against the best single source of the same family (deep-tuned, best test mean in that "
        f"target's column). {MISSING} = no result yet.",
        "",
    ]
    if not rows:
        return "\n".join(lines + ["No distillation cells in this plan.", ""])
    body = []
    for r in rows:
        family, sources, target, rule, lowrank = r.model
        st, bar, best = r.stat, r.bar, r.best
        vs = lambda other, st=st: _signed(None if st is None or other is None else 100 * (st.test - other.test))
        best_name = f"{paper.display(r.best_source or '')}: {_pct(best)}" if best else MISSING
        body.append(
            [
                paper.display(target),
                family,
                "+".join(map(paper.display, sources.split("+"))),
                rule,
                lowrank,
                _lr_text(r.lr),
                _pct(st),
                _pct(bar),
                vs(bar),
                best_name,
                vs(best),
            ]
        )
    head = [
        "target",
        "family",
        "sources",
        "rule",
        "lowrank",
        "LR",
        "merged",
        "ImageNet → target",
        "vs ImageNet",
        "best single source",
        "vs best source",
    ]
    return "\n".join(lines + _md_table(head, body) + [""])


# ---- the paper ------------------------------------------------------------------------------------------------


def _compare(m: Matrix) -> list[list]:
    """[source, target, ours mean, ours std, paper mean, paper std, ours − paper] (points), matched cells only."""
    published = paper.published(m.init)
    rows = []
    for s in m.rows:
        for t in m.cols:
            planned, st = m.at(s, t)
            if not planned or (s, t) not in published:
                continue
            pm, ps = published[(s, t)]
            ours = None if st is None else 100 * st.test
            std = None if st is None or st.std is None else 100 * st.std
            rows.append([s, t, ours, std, pm, ps, None if ours is None else ours - pm])
    return rows


def _compare_md(m: Matrix, rows: list[list], label: str) -> str:
    lines = [
        f"# {title(m)}: ours minus the paper (test top-1, points)",
        "",
        f"**{label[0].upper() + label[1:]}** (deviations.md lists every deviation and why it stays).",
        "",
        f"Published: docs/method.md §{'5.1' if m.init == 'random' else '5.2'} (HistoKT, 3 trials). Datasets are "
        "matched by name with the paper's cards (" + ", ".join(paper.CARDS) + f"). {MISSING}: no result yet.",
        "",
    ]
    if not rows:
        return "\n".join(lines + ["No dataset of this study has a paper card's name: nothing to compare.", ""])
    diffs = [r[6] for r in rows if r[6] is not None]
    if diffs:
        lines += [
            f"{len(diffs)} of {len(rows)} matched cells have a result: mean difference "
            f"{statistics.fmean(diffs):+.2f}, mean absolute difference "
            f"{statistics.fmean(map(abs, diffs)):.2f} points.",
            "",
        ]
    by = {(r[0], r[1]): r for r in rows}
    srcs = [s for s in m.rows if any((s, t) in by for t in m.cols)]
    tgts = [t for t in m.cols if any((s, t) in by for s in m.rows)]
    body = [
        [f"**{paper.display(s)}**", *((_signed(by[(s, t)][6]) or MISSING) if (s, t) in by else "" for t in tgts)]
        for s in srcs
    ]
    return "\n".join(lines + _md_table(["source \\ target", *map(paper.display, tgts)], body) + [""])


# ---- report ---------------------------------------------------------------------------------------------------


def _mixed_note(groups: dict[str, list[str]]) -> str:
    """The flag on every table of a study whose cells ran under more than one version ('' where one did)."""
    if len(groups) < 2:
        return ""
    return f"Mixed versions: these results come from {len(groups)} versions of histokt/Python/torch/image (report.md)"


def _report(
    doc: dict,
    run_root: Path,
    out: Path,
    scan: _Scan,
    matrices: list,
    distill: list,
    groups: dict[str, list[str]],
    seconds: float,
) -> str:
    st = scan.status
    total = sum(len(v) for v in st.values())
    lines = [
        f"# {doc.get('study', 'study')}: collection report",
        "",
        f"- spec digest `{doc.get('spec_digest')}`, histokt {__version__}, collected "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %z')} in {seconds:.2f} s",
        f"- training cells: {total}; done {len(st['done'])}, failed {len(st['failed'])}, blocked by a failed input "
        f"{len(st['blocked'])}, running or requeued "
        f"{len(st['running'])}, not started {len(st['missing'])}, corrupt or incomplete {len(st['corrupt'])}",
        "- "
        + (
            "**complete**: every training cell has its result"
            if total and len(st["done"]) == total
            else "**partial**: tables hold what is done; missing cells are marked " + MISSING
        ),
        "",
    ]
    lines += _md_table(
        ["stage", "done", "running", "failed", "blocked", "corrupt", "not started", "total"],
        [[s, *(str(c[k]) for k in STATUSES), str(sum(c.values()))] for s, c in scan.stages.items()],
    )
    if len(groups) > 1:
        lines += ["", f"## {_mixed_note(groups)}", ""]
        for version, ids in sorted(groups.items(), key=lambda g: -len(g[1])):
            named = ", ".join(f"`{c}`" for c in ids[:LISTED])
            lines.append(f"- {version}: {len(ids)} cells: {named}" + (" …" if len(ids) > LISTED else ""))
    lines += ["", "## Matrices", ""]
    if not matrices:
        lines.append("No transfer cells in this plan.")
    for m in matrices:
        cells = list(m.cells.values())
        gaps = [f"{s} → {t}" for (s, t), v in sorted(m.cells.items()) if v is None]
        gaps += [f"{t} (diagonal)" for t, v in m.diag.items() if v is None]
        lr = ", ".join(f"{t} {_lr_text(m.lr[t])}" for t in m.cols)
        lines.append(
            f"- `{m.name}`: {sum(c is not None for c in cells)}/{len(cells)} transfer cells, "
            f"{sum(v is not None for v in m.diag.values())}/{len(m.diag)} diagonal; LR per target: {lr}"
            + (f"; missing: {', '.join(gaps)}" if gaps else "")
        )
    if distill:
        done = sum(r.stat is not None for r in distill)
        lines += ["", f"Distillation: {done}/{len(distill)} merged models have results (distill.md)."]
    for kind, heading in (
        ("failed", "Failed"),
        ("blocked", "Blocked by an input cell that failed or is not done"),
        ("corrupt", "Corrupt or incomplete results (skipped)"),
        ("running", "Running or requeued"),
        ("missing", "Not started"),
    ):
        items = st[kind]
        if not items:
            continue
        lines += ["", f"## {heading} ({len(items)})", ""]
        shown = items if kind != "missing" else items[:LISTED]
        lines += [f"- `{x['cell']}` ({x['stage']}): {x['why']}" for x in shown]
        if len(shown) < len(items):
            lines.append(f"- … and {len(items) - len(shown)} more (`histokt status {run_root}` counts them)")
    lines += [
        "",
        f"Files in `{out}`: transfer.csv, distill.csv/.md"
        + "".join(f", {m.name}.csv/.md/.tex/.png" for m in matrices)
        + ".",
        "",
    ]
    return "\n".join(lines)
