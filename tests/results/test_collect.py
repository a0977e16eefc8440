"""`histokt collect`: exact tables from a run root of known numbers, LR selection on validation, partial and
broken run roots, the LaTeX table, the heatmap, distillation and the comparison with the paper."""

import csv
import json
import re
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histokt import cli
from histokt.errors import UserError
from histokt.result import BestValid, CellResult
from histokt.results import paper
from histokt.results.collect import collect
from histokt.study import plan
from tests.conftest import ROOT

DATASETS = ("adp", "mhist", "bach")
FAMILIES = ("random", "imagenet")
LRS = (1e-3, 1e-4)
SEEDS = (0, 1, 2)
OFFSETS = (-0.01, 0.0, 0.01)  # per seed, on valid and test: every group has mean = base and std = 1.00 point
STAGE_A_LR = 0.03

# (family, mode, source, target, lr) -> (valid, test) means; everything else gets _default()
KNOWN = {
    ("random", "scratch", "adp", "adp", STAGE_A_LR): (0.90, 0.92),
    ("random", "scratch", "mhist", "mhist", STAGE_A_LR): (0.80, 0.81),
    ("random", "scratch", "bach", "bach", STAGE_A_LR): (0.85, 0.86),
    ("imagenet", "scratch", "mhist", "mhist", STAGE_A_LR): (0.84, 0.835),
    # target mhist: LR 1e-3 wins on validation (0.845 vs 0.81) although 1e-4 tests better for both sources
    ("random", "deep", "adp", "mhist", 1e-3): (0.85, 0.78),
    ("random", "deep", "adp", "mhist", 1e-4): (0.80, 0.84),
    ("random", "deep", "bach", "mhist", 1e-3): (0.84, 0.79),
    ("random", "deep", "bach", "mhist", 1e-4): (0.82, 0.86),
    # target bach: 1e-3 wins over both sources (0.825 vs 0.75), so mhist -> bach is shown at 1e-3 even though
    # mhist's own validation prefers 1e-4: the same LR for every source
    ("random", "deep", "adp", "bach", 1e-3): (0.90, 0.91),
    ("random", "deep", "adp", "bach", 1e-4): (0.70, 0.70),
    ("random", "deep", "mhist", "bach", 1e-3): (0.75, 0.75),
    ("random", "deep", "mhist", "bach", 1e-4): (0.80, 0.88),
}
# (family, sources, target, rule, lowrank, lr) -> (valid, test)
KNOWN_DISTILL = {
    ("random", "adp+bach", "mhist", "maxkg", True, 1e-3): (0.83, 0.845),
    ("random", "adp+bach", "mhist", "maxkg", True, 1e-4): (0.86, 0.82),
    ("random", "adp+bach", "mhist", "maxkg", False, 1e-3): (0.80, 0.90),
    ("random", "adp+bach", "mhist", "maxkg", False, 1e-4): (0.79, 0.70),
}


def _default(key):
    if key[1] == "scratch":
        return 0.90, 0.93
    return (0.60 if key[-1] == 1e-3 else 0.65), 0.70


def _result(valid, test, lr):
    """A result.json as histokt train writes it (histokt.result's schema), with the given scores."""
    return CellResult(
        config={"lr": lr},
        classes=["a", "b"],
        valid=BestValid(top1_best=valid, best_epoch=3),
        test={"top1": test, "balanced_acc": test, "per_class_acc": [test, test], "n": 10, "loss": 0.5},
        epochs=4,
        steps=40,
        world_size=1,
        seconds=1.5,
        histokt_version="0.1.0",
    ).to_json()


def make_run_root(root: Path, distill: bool = True) -> Path:
    """A run root as a sweep leaves it: plan.json (written like plan.write) and every cell's result.json."""
    stages = {"pretrain": [], "transfer": [], "distill": []}
    results = {}
    for d in DATASETS:
        for fam in FAMILIES:
            for seed in SEEDS:
                c = plan.Cell(
                    "pretrain",
                    f"A-{d}-{fam}-s{seed}",
                    "train",
                    {"dataset": d, "seed": seed},
                    meta={"family": fam, "source": d, "target": d, "mode": "scratch", "lr": STAGE_A_LR, "seed": seed},
                )
                stages["pretrain"].append(c)
                results[c.id] = (c, KNOWN.get((fam, "scratch", d, d, STAGE_A_LR)) or _default((fam, "scratch")))
    for fam in FAMILIES:
        for s in DATASETS:
            for t in DATASETS:
                if s == t:
                    continue
                for mode in ("fine", "deep"):
                    for lr in LRS:
                        for seed in SEEDS:
                            c = plan.Cell(
                                "transfer",
                                f"B-{fam}-{s}-{t}-{mode}-lr{plan.lr_name(lr)}-s{seed}",
                                "train",
                                {"dataset": t, "lr": lr, "seed": seed},
                                meta={"family": fam, "source": s, "target": t, "mode": mode, "lr": lr, "seed": seed},
                            )
                            stages["transfer"].append(c)
                            key = (fam, mode, s, t, lr)
                            results[c.id] = (c, KNOWN.get(key) or _default(key))
    if distill:
        for (fam, sources, t, rule, lowrank, lr), vt in KNOWN_DISTILL.items():
            for seed in SEEDS:
                c = plan.Cell(
                    "distill",
                    f"D-{fam}-{sources}-{t}-{rule}-{'svd' if lowrank else 'raw'}-lr{plan.lr_name(lr)}-s{seed}",
                    "train",
                    {"dataset": t, "lr": lr, "seed": seed},
                    meta={
                        "family": fam,
                        "source": sources,
                        "target": t,
                        "mode": "deep",
                        "lr": lr,
                        "seed": seed,
                        "rule": rule,
                        "lowrank": lowrank,
                    },
                )
                stages["distill"].append(c)
                results[c.id] = (c, vt)
    else:
        del stages["distill"]
    stages["collect"] = [plan.Cell("collect", "collect", "collect", {})]
    doc = {
        "format": plan.PLAN_FORMAT,
        "study": "known",
        "spec_digest": "d1g35t",
        "store": "store.zarr",
        "stages": {stage: [asdict(c) for c in cells] for stage, cells in stages.items()},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(json.dumps(doc))
    for cell, (valid, test) in results.values():
        off = OFFSETS[cell.meta["seed"]]
        directory = plan.cell_dir(root, cell)
        directory.mkdir(parents=True)
        (directory / "result.json").write_text(json.dumps(_result(valid + off, test + off, cell.meta["lr"])))
        (directory / "state.json").write_text(json.dumps({"status": "done", "attempts": 1}))
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def matrix(path: Path) -> dict:
    """{row label: {column: text}} of a matrix CSV."""
    return {r["source"]: {k: v for k, v in r.items() if k != "source"} for r in read_csv(path)}


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    root = make_run_root(tmp_path_factory.mktemp("complete") / "runs")
    summary = collect(root, compare_paper=True)
    return root, root / "summary", summary


def test_transfer_csv_long_rows_exactly(complete):
    _root, out, summary = complete
    rows = read_csv(out / "transfer.csv")
    assert list(rows[0]) == [
        "init",
        "mode",
        "source",
        "target",
        "lr",
        "n",
        "valid_top1_mean",
        "test_top1_mean",
        "test_top1_std",
    ]
    assert len(rows) == summary["rows"] == 2 * 3 + 2 * 2 * 6 * 2  # Stage A diagonals + transfer groups
    by = {(r["init"], r["mode"], r["source"], r["target"], r["lr"]): r for r in rows}
    assert by[("random", "deep", "adp", "mhist", "0.001")] == {
        "init": "random",
        "mode": "deep",
        "source": "adp",
        "target": "mhist",
        "lr": "0.001",
        "n": "3",
        "valid_top1_mean": "0.85",
        "test_top1_mean": "0.78",
        "test_top1_std": "0.01",
    }
    assert by[("random", "scratch", "mhist", "mhist", "0.03")]["test_top1_mean"] == "0.81"
    assert by[("random", "deep", "mhist", "bach", "0.0001")]["test_top1_mean"] == "0.88"
    assert not any(r["source"] == "adp+bach" for r in rows)  # merged models live in distill.csv
    assert summary["done"] == 18 + 144 + 12 and summary["failed"] == summary["missing"] == summary["corrupt"] == 0


def test_matrix_picks_the_lr_on_validation_the_same_for_every_source(complete):
    _, out, _ = complete
    m = matrix(out / "matrix_random_deep.csv")
    assert list(m) == ["adp", "mhist", "bach", "lr", "gain adp", "gain mhist", "gain bach"]
    # mhist: 1e-3 has the best mean validation (0.845 vs 0.81) though 1e-4 tests better (84, 86)
    assert m["lr"] == {"adp": "1e-4", "mhist": "1e-3", "bach": "1e-3"}
    assert m["adp"]["mhist"] == "78.00 ± 1.00" and m["bach"]["mhist"] == "79.00 ± 1.00"
    # bach: mhist -> bach at 1e-3 (75), not at its own best validation LR (1e-4, 88)
    assert m["mhist"]["bach"] == "75.00 ± 1.00" and m["adp"]["bach"] == "91.00 ± 1.00"
    # diagonal = random-init Stage A on the target; gain over it in points
    assert m["adp"]["adp"] == "92.00 ± 1.00" and m["mhist"]["mhist"] == "81.00 ± 1.00"
    assert m["gain adp"]["mhist"] == "-3.00" and m["gain bach"]["mhist"] == "-2.00"
    assert m["gain adp"]["bach"] == "+5.00" and m["gain mhist"]["bach"] == "-11.00"
    assert m["gain adp"]["adp"] == ""
    # imagenet family: the diagonal is ImageNet -> target
    assert matrix(out / "matrix_imagenet_deep.csv")["mhist"]["mhist"] == "83.50 ± 1.00"
    md = (out / "matrix_random_deep.md").read_text()
    assert "| **MHIST** | 70.00 ± 1.00 | **81.00 ± 1.00** | 75.00 ± 1.00 |" in md
    assert "| LR | 1e-4 | 1e-3 | 1e-3 |" in md and "| **ADP** |  | -3.00 | +5.00 |" in md


def test_every_matrix_and_file_is_written(complete):
    _, out, summary = complete
    assert summary["matrices"] == [
        "matrix_imagenet_fine",
        "matrix_imagenet_deep",
        "matrix_random_fine",
        "matrix_random_deep",
    ]
    for name in summary["matrices"]:
        for ext in ("csv", "md", "tex", "png"):
            assert (out / f"{name}.{ext}").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == summary["files"]  # no temporary file left behind


def test_distill_table_against_imagenet_and_best_single_source(complete):
    _, out, _ = complete
    rows = {r["lowrank"]: r for r in read_csv(out / "distill.csv")}
    assert set(rows) == {"true", "false"}
    svd = rows["true"]
    # its own LR on validation (1e-4: 0.86 > 0.83), ImageNet -> mhist 83.5, best single source bach -> mhist 79
    assert (svd["family"], svd["target"], svd["sources"], svd["rule"], svd["lr"], svd["n"]) == (
        "random",
        "mhist",
        "adp+bach",
        "maxkg",
        "0.0001",
        "3",
    )
    assert float(svd["top1_pct_mean"]) == pytest.approx(82.0) and float(svd["top1_pct_std"]) == pytest.approx(1.0)
    assert float(svd["imagenet_pct_mean"]) == pytest.approx(83.5)
    assert float(svd["gain_vs_imagenet_pp"]) == pytest.approx(-1.5)
    assert svd["best_source"] == "bach" and float(svd["best_source_pct_mean"]) == pytest.approx(79.0)
    assert float(svd["gain_vs_best_source_pp"]) == pytest.approx(3.0)
    raw = rows["false"]
    assert raw["lr"] == "0.001" and float(raw["gain_vs_imagenet_pp"]) == pytest.approx(6.5)
    md = (out / "distill.md").read_text()
    assert "| MHIST | random | ADP+BACH | maxkg | false | 1e-3 | 90.00 ± 1.00 | 83.50 ± 1.00 | +6.50 |" in md


def test_compare_with_the_paper_on_known_cells(complete):
    _, out, _ = complete
    rows = {(r["source"], r["target"]): r for r in read_csv(out / "compare_random_deep.csv")}
    assert len(rows) == 9  # 3 datasets named like paper cards: 6 transfers + 3 diagonals
    r = rows[("adp", "mhist")]
    assert float(r["ours_mean"]) == pytest.approx(78.0) and r["paper_mean"] == "78.74"
    assert float(r["diff_pp"]) == pytest.approx(78.0 - 78.74)  # method.md §5.1, ADP -> MHIST
    assert float(rows[("mhist", "mhist")]["diff_pp"]) == pytest.approx(81.0 - 80.83)
    assert float(read_csv(out / "compare_imagenet_deep.csv")[4]["paper_mean"]) == 83.52  # §5.2 MHIST diagonal
    assert "| **ADP** | -1.56 | -0.74 | -2.11 |" in (out / "compare_random_deep.md").read_text()
    assert not (out / "compare_random_fine.csv").exists()  # the paper's matrices are deep-tuned


def test_collect_again_gives_the_same_files(complete, tmp_path):
    root, out, _ = complete
    again = tmp_path / "again"
    collect(root, out=again, compare_paper=True)
    for f in out.iterdir():
        if f.name != "report.md":  # the report carries the date
            assert (again / f.name).read_bytes() == f.read_bytes(), f.name


def test_heatmap_png_decodes(complete):
    _, out, _ = complete
    with Image.open(out / "matrix_random_deep.png") as im:
        im.load()
        w, h = im.size
        colours = len(np.unique(np.asarray(im.convert("RGB").resize((64, 64))).reshape(-1, 3), axis=0))
    assert 300 <= w <= 2500 and 200 <= h <= 2000
    assert colours > 20  # a drawn figure, not a blank canvas


def _tex_rows(tex: str) -> tuple[str, list[str]]:
    body = [line for line in tex.splitlines() if not line.startswith("%")]
    spec = re.fullmatch(r"\\begin\{tabular\}\{(.*)\}", body[0]).group(1)
    rows = [line for line in body if line.endswith("\\\\")]
    return spec, rows


def _cells(row: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)&", row[: -len("\\\\")])]


def test_latex_table_structure(complete):
    _, out, _ = complete
    tex = (out / "matrix_random_deep.tex").read_text()
    stripped = tex.replace("\\{", "").replace("\\}", "")
    depth = 0
    for ch in stripped:
        depth += (ch == "{") - (ch == "}")
        assert depth >= 0
    assert depth == 0
    spec, rows = _tex_rows(tex)
    assert spec == "l|ccc" and tex.count("\\begin{tabular}") == tex.count("\\end{tabular}") == 1
    assert len(rows) == 1 + len(DATASETS)  # the header, then one row per source
    header, *sources = [_cells(r) for r in rows]
    assert header == ["src $\\backslash$ tgt", "\\textbf{ADP}", "\\textbf{MHIST}", "\\textbf{BACH}"]
    for i, cells in enumerate(sources):
        assert len(cells) == 4 and cells[0] == f"\\textbf{{{paper.display(DATASETS[i])}}}"
        for j, cell in enumerate(cells[1:]):
            if i == j:
                assert cell.startswith("\\textbf{") and "\\cellcolor" not in cell
            else:
                assert cell.startswith("\\cellcolor{"), cell
    # paper style mean$_{std}$; green for a gain, red for a loss, stronger for the column's largest
    assert sources[0][3] == "\\cellcolor{green!60}91.00$_{1.00}$"  # ADP -> BACH: +5
    assert sources[1][3] == "\\cellcolor{red!60}75.00$_{1.00}$"  # MHIST -> BACH: -11
    assert sources[0][2].startswith("\\cellcolor{red!") and sources[1][2] == "\\textbf{81.00$_{1.00}$}"


def test_latex_table_compiles(complete, tmp_path):
    exe = shutil.which("pdflatex")
    if exe is None:
        pytest.skip("pdflatex is not on PATH: the LaTeX structure is checked by test_latex_table_structure")
    _, out, _ = complete
    shutil.copy(out / "matrix_random_deep.tex", tmp_path / "table.tex")
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\n\\usepackage[table]{xcolor}\n"
        "\\begin{document}\n\\input{table.tex}\n\\end{document}\n"
    )
    r = subprocess.run(
        [exe, "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 0


@pytest.fixture
def broken(tmp_path):
    """The known run root with cells missing, failed, running, corrupt and incomplete."""
    root = make_run_root(tmp_path / "runs")
    cells = root / "cells"
    for seed in SEEDS:  # bach -> mhist at the chosen LR: never finished
        (cells / "transfer" / f"B-random-bach-mhist-deep-lr1e-3-s{seed}" / "result.json").unlink()
        (cells / "transfer" / f"B-random-bach-mhist-deep-lr1e-3-s{seed}" / "state.json").unlink()
    for seed in SEEDS:  # the random-init Stage A of bach: failed
        d = cells / "pretrain" / f"A-bach-random-s{seed}"
        (d / "result.json").unlink()
        (d / "state.json").write_text(json.dumps({"status": "failed", "error": "CUDA error: out of memory"}))
    running = cells / "transfer" / "B-random-mhist-adp-deep-lr1e-3-s0"
    (running / "result.json").unlink()
    (running / "state.json").write_text(json.dumps({"status": "running"}))
    (cells / "transfer" / "B-random-mhist-adp-deep-lr1e-4-s1" / "result.json").write_text('{"valid": {"top1_be')
    (cells / "transfer" / "B-random-adp-bach-deep-lr1e-3-s2" / "result.json").write_text('{"config": {}, "valid": {}}')
    (cells / "transfer" / "B-random-adp-mhist-deep-lr1e-3-s2" / "result.json").write_text(
        json.dumps(_result(None, 0.5, 1e-3))
    )
    (cells / "transfer" / "B-random-adp-bach-fine-lr1e-3-s0" / "state.json").write_text("{garbage")
    return root


def test_partial_run_root_reports_and_still_makes_matrices(broken):
    summary = collect(broken)
    out = broken / "summary"
    assert (summary["done"], summary["failed"], summary["running"], summary["missing"], summary["corrupt"]) == (
        174 - 3 - 3 - 1 - 3,
        3,
        1,
        3,
        3,
    )
    m = matrix(out / "matrix_random_deep.csv")
    assert m["bach"]["mhist"] == "—" and m["bach"]["bach"] == "—"  # missing transfer, failed diagonal
    assert m["adp"]["bach"] == "90.50 ± 0.71" and m["gain adp"]["bach"] == ""  # seeds 0, 1 left; no diagonal
    assert m["adp"]["mhist"] == "77.50 ± 0.71"  # seed 2's valid top-1 was unusable: 77, 78 left
    md = (out / "matrix_random_deep.md").read_text()
    assert "| **BACH** | 70.00 ± 1.00 | — | — |" in md
    tex = (out / "matrix_random_deep.tex").read_text()
    assert "\\cellcolor{gray!25}---" in tex
    with Image.open(out / "matrix_random_deep.png") as im:
        assert im.size[0] > 300
    report = (out / "report.md").read_text()
    assert "`d1g35t`" in report and "histokt 0.1.0" in report and "**partial**" in report
    assert "`A-bach-random-s0` (pretrain): CUDA error: out of memory" in report
    assert "`B-random-mhist-adp-deep-lr1e-3-s0` (transfer): running" in report
    assert "`B-random-mhist-adp-deep-lr1e-4-s1` (transfer): corrupt result.json (JSONDecodeError)" in report
    assert "`B-random-adp-bach-deep-lr1e-3-s2` (transfer): incomplete result.json" in report
    assert "`B-random-bach-mhist-deep-lr1e-3-s0` (transfer): not started" in report
    assert "bach → mhist" in report and "bach (diagonal)" in report


def test_a_cell_blocked_by_a_failed_input_says_which(broken):
    """The transfers of bach's failed Stage A never train (exit 4): the report names their blocker."""
    blocked = broken / "cells" / "transfer" / "B-random-bach-adp-deep-lr1e-3-s0"
    (blocked / "result.json").unlink()
    (blocked / "state.json").write_text(
        json.dumps({"status": "blocked", "blocked_by": "pretrain/A-bach-random-s0", "error": "input missing: best.pt"})
    )
    summary = collect(broken)
    assert summary["blocked"] == 1 and summary["failed"] == 3
    report = (broken / "summary" / "report.md").read_text()
    assert "## Blocked by an input cell that failed or is not done (1)" in report
    assert (
        "`B-random-bach-adp-deep-lr1e-3-s0` (transfer): blocked by pretrain/A-bach-random-s0: input missing: best.pt"
        in report
    )
    assert "blocked by a failed input 1," in report


def test_plan_without_distillation_and_cli(tmp_path, capsys):
    root = make_run_root(tmp_path / "runs", distill=False)
    assert cli.main(["collect", str(root), "--out", str(tmp_path / "s"), "--compare-paper"]) == 0
    assert "matrix_random_deep" in capsys.readouterr().out
    assert read_csv(tmp_path / "s" / "distill.csv") == []
    assert "No distillation cells" in (tmp_path / "s" / "distill.md").read_text()
    assert (tmp_path / "s" / "compare_imagenet_deep.md").is_file() and not (root / "summary").exists()


def test_missing_or_corrupt_plan_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no plan.json"):
        collect(tmp_path)
    (tmp_path / "plan.json").write_text('{"stages": {"pretrain": [{"stage": ')
    with pytest.raises(UserError, match="corrupt"):
        collect(tmp_path)


def test_paper_tables_match_the_reference():
    ref = ROOT.parent / "shared" / "reference" / "method.md"
    if not ref.is_file():
        pytest.skip(f"{ref} is absent (it ships beside the repository in CI)")
    text = ref.read_text()
    for section, init in (("### 5.1", "random"), ("### 5.2", "imagenet")):
        part = text.split(section, 1)[1].split("###", 1)[0]
        rows = [line for line in part.splitlines() if line.startswith("| ") and "src" not in line]
        got = [[(float(a), float(b)) for a, b in re.findall(r"\**([\d.]+)\** \(([\d.]+)\)", r)] for r in rows]
        assert got == [list(paper.MATRICES[init][c]) for c in paper.CARDS]


def test_results_of_two_versions_are_flagged_on_every_table(complete, tmp_path):
    root, out, _ = complete
    for name in ("report.md", "matrix_random_deep.md", "matrix_random_deep.tex", "distill.md"):
        assert "Mixed versions" not in (out / name).read_text(), name  # one version: no flag
    mixed = tmp_path / "runs"
    shutil.copytree(root, mixed, ignore=shutil.ignore_patterns("summary"))
    rt = {"python": "3.11.7", "torch": "2.14.1", "histokt": "0.1.0", "commit": None, "container": None}
    paths = sorted(mixed.glob("cells/*/*/result.json"))
    for k, path in enumerate(paths):
        doc = json.loads(path.read_text())
        doc["runtime"] = {**rt, "histokt": "0.2.0"} if k < 2 else rt
        path.write_text(json.dumps(doc))
    collect(mixed)
    report = (mixed / "summary" / "report.md").read_text()
    assert "## Mixed versions: these results come from 2 versions" in report
    newer = next(line for line in report.splitlines() if line.startswith("- histokt 0.2.0,"))
    assert newer.startswith("- histokt 0.2.0, Python 3.11, torch 2.14.1, image none: 2 cells: ")
    assert all(f"`{p.parent.name}`" in newer for p in paths[:2]) and paths[2].parent.name not in newer
    for name in ("matrix_random_deep.md", "matrix_random_deep.tex", "distill.md"):
        assert "Mixed versions: these results come from 2 versions" in (mixed / "summary" / name).read_text(), name


# ---- deviations from the paper ------------------------------------------------------------------------------


def _with_deviations(root: Path, protocol_name: str, study: list, per_cell) -> None:
    """Give a run root's plan.json a protocol and study deviations, and each result.json ``per_cell(cell)``."""
    doc = json.loads((root / "plan.json").read_text())
    doc.update(protocol=protocol_name, deviations=[d.to_json() for d in study])
    (root / "plan.json").write_text(json.dumps(doc))
    for cells in plan.read(root).values():
        for cell in cells:
            path = plan.cell_dir(root, cell) / "result.json"
            if path.is_file():
                result = json.loads(path.read_text())
                result["deviations"] = [d.to_json() for d in per_cell(cell)]
                path.write_text(json.dumps(result))


def test_compare_paper_states_each_deviation_first_and_labels_the_matrices(tmp_path, capsys):
    from histokt.protocol import FIXED, Deviation, study_deviations

    root = make_run_root(tmp_path / "runs")
    grid = study_deviations(lrs_fixed=False, trial_sources="matched", merges=True)
    bf16 = Deviation("precision", "bf16", "fp32")
    sgd = Deviation("stage A optimizer", "sgd", "adas")
    # the ImageNet family ran in bf16 everywhere; every Stage-A cell used SGD
    _with_deviations(
        root,
        "histokt",
        grid,
        lambda c: ([sgd] if c.meta["mode"] == "scratch" else []) + ([bf16] if c.meta["family"] == "imagenet" else []),
    )
    assert cli.main(["collect", str(root), "--compare-paper"]) == 0
    printed = capsys.readouterr().out
    assert printed.index("# Deviations from the paper") < printed.index("cells done")  # stated first
    table = read_csv(root / "summary" / "deviations.csv")
    rows = {(r["scope"], r["what"]): r for r in table}
    assert rows[("study", "transfer LR")]["paper"] == "best_lrs table"
    assert rows[("study", "trials")]["cells"] == "all"
    assert rows[("study", "split shuffles")]["cannot be removed because"] == FIXED[0].fixed
    assert rows[("study", "merge rule")]["cannot be removed because"].startswith("the paper's merge script")
    # 3 datasets x 3 seeds of Stage A per family, and 6 pairs x 2 LRs x 3 seeds of deep transfers
    assert rows[("random", "stage A optimizer")]["cells"] == "9/45"
    assert rows[("imagenet", "precision")]["cells"] == "45/45"
    assert ("random", "precision") not in rows
    random_md = (root / "summary" / "compare_random_deep.md").read_text()
    assert "**Differs in: transfer LR, trials, stage A optimizer**" in random_md
    assert "precision" not in random_md
    assert "stage A optimizer, precision**" in (root / "summary" / "compare_imagenet_deep.md").read_text()


def test_a_parity_study_lists_only_what_cannot_be_removed(tmp_path):
    from histokt.protocol import study_deviations

    root = make_run_root(tmp_path / "runs")
    _with_deviations(root, "paper", study_deviations(lrs_fixed=True, trial_sources="first", merges=True), lambda c: [])
    collect(root, compare_paper=True)
    rows = read_csv(root / "summary" / "deviations.csv")
    assert {r["what"] for r in rows} == {"split shuffles", "merge rule"}
    assert all(r["cannot be removed because"] for r in rows)
    assert "**Like for like**" in (root / "summary" / "compare_random_deep.md").read_text()
    assert "Protocol: **paper**" in (root / "summary" / "deviations.md").read_text()


def test_results_without_a_deviation_record_are_never_like_for_like(tmp_path):
    root = make_run_root(tmp_path / "runs")  # result.json files as written before deviations were recorded
    collect(root, compare_paper=True)
    rows = {r["what"]: r for r in read_csv(root / "summary" / "deviations.csv") if r["scope"] == "random"}
    assert rows["unrecorded"]["cells"] == "45/45"
    assert "Differs in: unrecorded" in (root / "summary" / "compare_random_deep.md").read_text()


def test_a_plan_without_deviations_says_so_instead_of_looking_like_the_paper(tmp_path):
    root = make_run_root(tmp_path / "runs")  # plan.json as written before deviations were recorded
    _with_deviations(root, "histokt", [], lambda c: [])
    doc = json.loads((root / "plan.json").read_text())
    del doc["deviations"]
    (root / "plan.json").write_text(json.dumps(doc))
    collect(root, compare_paper=True)
    rows = read_csv(root / "summary" / "deviations.csv")
    assert [r["what"] for r in rows] == ["unrecorded plan"]
    assert "Differs in: unrecorded plan" in (root / "summary" / "compare_random_deep.md").read_text()
