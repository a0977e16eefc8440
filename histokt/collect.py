"""`histokt collect RUN_ROOT`: summary tables from the cells' result.json files, offline.

This first version writes the long table and a completeness report; the transfer matrices, heatmaps and
LaTeX of the paper build on the same rows. A missing, partial or corrupt result.json is listed and
skipped, never a crash. Only plan.json (the cells and what they compute) and result.json files are read.
"""

import csv
import io
import json
import math
import statistics
import time
from pathlib import Path

from . import __version__, atomic, plan

COLUMNS = ["init", "mode", "source", "target", "lr", "n", "valid_top1_mean", "test_top1_mean", "test_top1_std"]


def read_result(path: Path):
    """(result, problem): the parsed result.json, or None and why it was skipped."""
    try:
        result = json.loads(path.read_text())
        return result, None if {"valid", "test"} <= set(result) else "incomplete result.json"
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as exc:
        return None, f"corrupt result.json ({type(exc).__name__})"


def collect(run_root, out=None) -> dict:
    run_root = Path(run_root)
    out = Path(out) if out else run_root / "summary"
    cells = plan.read(run_root)
    groups, status = {}, {"done": [], "missing": [], "failed": [], "corrupt": []}
    for stage, members in cells.items():
        for cell in members:
            if cell.kind != "train":
                continue
            directory = plan.cell_dir(run_root, cell)
            result, problem = read_result(directory / "result.json")
            if result is None or problem:
                state = atomic.read_json(directory / "state.json") or {}
                kind = "failed" if state.get("status") == "failed" else "corrupt" if "corrupt" in (problem or "") \
                    else "missing"
                status[kind].append({"cell": cell.id, "why": state.get("error") or problem})
                continue
            if result is not None and not problem:
                status["done"].append(cell.id)
                m = cell.meta
                lr = m.get("lr") if m.get("lr") is not None else result["config"].get("lr")
                key = (m["family"], m["mode"], m["source"], m["target"], lr)
                groups.setdefault(key, []).append(result)
    rows = [_row(key, results) for key, results in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0])))]
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(rows)
    atomic.write_bytes(out / "transfer.csv", buf.getvalue().encode())
    atomic.write_bytes(out / "report.md", _report(run_root, status).encode())
    return {"rows": len(rows), **{k: len(v) for k, v in status.items()}}


def _row(key, results) -> list:
    valid = [r["valid"]["top1_best"] for r in results]
    test = [r["test"]["top1"] for r in results]
    std = statistics.stdev(test) if len(test) > 1 else math.nan  # sample std (ddof=1), as the paper
    return [*key, len(results), statistics.fmean(valid), statistics.fmean(test), std]


def _report(run_root: Path, status: dict) -> str:
    doc = atomic.read_json(run_root / "plan.json") or {}
    total = sum(len(v) for v in status.values())
    lines = [
        f"# {doc.get('study', 'study')}: collection report",
        "",
        f"- spec digest `{doc.get('spec_digest')}`, histokt {__version__}, {time.strftime('%Y-%m-%d %H:%M')}",
        f"- training cells: {total}; done {len(status['done'])}, failed {len(status['failed'])}, "
        f"missing or running {len(status['missing'])}, corrupt {len(status['corrupt'])}",
        "",
    ]
    for kind in ("failed", "corrupt", "missing"):
        if status[kind]:
            lines += [f"## {kind}", ""] + [f"- `{x['cell']}`: {x['why']}" for x in status[kind]] + [""]
    return "\n".join(lines)
