"""`histokt sweep` on the local executor (the embedded default): the whole demo study, idempotent re-runs,
a killed sweep that continues, a failing cell that does not stop the rest, and `histokt status`."""

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from histokt.batch.demo import write_collection
from tests.conftest import ROOT, histokt_cmd

SPEC = ROOT / "tests" / "fixtures" / "small_study.toml"


@pytest.fixture
def study(tmp_path):
    write_collection(tmp_path / "demo", per_class=4, seed=0)
    return tmp_path


def sweep(cwd, *extra, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        histokt_cmd("sweep", SPEC, "--executor", "local", "--no-progress", *extra),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        **kw,
    )


def rows(run_root: Path):
    with open(run_root / "summary" / "transfer.csv") as f:
        return list(csv.DictReader(f))


def test_demo_study_end_to_end_then_nothing_to_do(study):
    r = sweep(study)
    assert r.returncode == 0, r.stderr
    runs = study / "demo" / "runs"
    assert (runs / "spec.toml").read_text() == SPEC.read_text()
    plan = json.loads((runs / "plan.json").read_text())
    stages = ("standardize", "pretrain", "transfer", "merge", "distill", "collect")
    assert [len(plan["stages"][s]) for s in stages] == [3, 2, 2, 1, 1, 1]
    got = {(x["init"], x["mode"], x["source"], x["target"]) for x in rows(runs)}
    assert got == {
        ("random", "scratch", "crc", "crc"),
        ("random", "scratch", "mhist", "mhist"),
        ("random", "deep", "crc", "mhist"),
        ("random", "deep", "mhist", "crc"),
    }
    for cell in ("A-crc-random-s0", "B-random-crc-mhist-deep-lr1e-3-s0"):
        assert (runs / "cells" / ("pretrain" if cell[0] == "A" else "transfer") / cell / "result.json").is_file()
    merged = runs / "cells" / "merge" / "M-random-crc+mhist-kg-select-s0"
    assert (merged / "merged.pt").is_file() and json.loads((merged / "merged.json").read_text())["rule"] == "kg-select"
    with open(runs / "summary" / "distill.csv") as f:
        distilled = list(csv.DictReader(f))
    assert len(distilled) == 1 and distilled[0]["target"] == "mhist" and distilled[0]["sources"] == "crc+mhist"
    for name in ("matrix_random_deep.png", "matrix_random_deep.tex", "report.md"):
        assert (runs / "summary" / name).stat().st_size > 0
    again = sweep(study)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    status = subprocess.run(
        histokt_cmd("status", runs), env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True
    )
    assert "10/10 cells done" in status.stdout and "failed" not in status.stdout.split("\n", 1)[1].split("[")[0]


def test_failing_cell_does_not_stop_the_rest_and_is_reported(study):
    (study / "demo" / "raw" / "mhist" / "annotations.csv").write_text("Image Name,Partition\n")  # broken download
    r = sweep(study)
    assert r.returncode == 1
    runs = study / "demo" / "runs"
    report = (runs / "summary" / "report.md").read_text()
    assert "A-mhist-random-s0" in report and "input missing" in report
    assert {(x["source"], x["target"]) for x in rows(runs)} == {("crc", "crc")}  # the rest finished
    status = subprocess.run(
        histokt_cmd("status", runs), env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True
    ).stdout
    assert "failed standardize/std-mhist-0of1: " in status and "verify the download" in status
    assert "preempted" not in status
    state_file = runs / "cells" / "pretrain" / "A-crc-random-s0" / "state.json"  # as two preemptions leave it
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "interrupted_at_steps": [3, 7]}))
    status = subprocess.run(
        histokt_cmd("status", runs), env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True
    ).stdout
    assert "preempted 2 time(s), 1 cell(s)" in status


def test_killed_sweep_continues_where_it_stopped(study):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        histokt_cmd("sweep", SPEC, "--executor", "local", "--no-progress"),
        cwd=study,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = study / "demo" / "runs" / "cells" / "pretrain" / "A-crc-random-s0" / "last.pt"
    while not last.exists():
        assert proc.poll() is None, "the sweep ended before a pretrain checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and every cell it started
    proc.wait()
    r = sweep(study)
    assert r.returncode == 0, r.stderr
    state = json.loads((last.parent / "state.json").read_text())
    assert state["status"] == "done" and state["attempts"] == 2
    assert len(rows(study / "demo" / "runs")) == 4
    assert (
        study / "demo" / "runs" / "cells" / "distill" / "D-random-crc+mhist-kg-select-mhist-lr1e-3-s0" / "result.json"
    ).is_file()


def test_dry_run_of_the_paper_spec(tmp_path, monkeypatch, capsys):
    """The README's `histokt sweep jobs/paper.toml --executor slurm --dry-run`: counts and scripts, nothing written."""
    import tomllib

    from histokt import cli

    doc = tomllib.loads((ROOT / "jobs" / "paper.toml").read_text())
    for d in doc["datasets"].values():  # the spec checks that every raw folder exists
        (tmp_path / d["raw"]).mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert cli.main(["sweep", str(ROOT / "jobs" / "paper.toml"), "--executor", "slurm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    counts = {line.split()[0]: int(line.split()[-2]) for line in out.splitlines() if " to run of " in line}
    assert sum(counts.values()) == 4675 and counts["collect"] == 1
    scripts = out.split("# ---- sbatch script of stage ")[1:]
    assert [s.split()[0] for s in scripts] == [s for s in counts if counts[s]]
    assert "#SBATCH --array=0-" in scripts[1] and "afterany" in scripts[1]  # pretrain waits for standardize
    assert out.rstrip().endswith("dry run: nothing submitted")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no run root, no plan


def test_another_histokt_version_is_refused_then_allowed_and_flagged(study):
    """A study started under this histokt; then a copy with an edited version file: the sweep refuses (one
    line, both versions); with --allow-version-change the cell it re-runs runs under it, and the report says
    which cells ran under which version."""
    runs = study / "demo" / "runs"
    for stage in ("standardize", "pretrain"):
        assert sweep(study, "--only", stage).returncode == 0
    edited = study / "edited"
    shutil.copytree(ROOT / "histokt", edited / "histokt", ignore=shutil.ignore_patterns("__pycache__"))
    init = edited / "histokt" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "0.1.0"', '__version__ = "0.1.0+edited"'))
    cell = runs / "cells" / "pretrain" / "A-mhist-random-s0"
    shutil.rmtree(cell)  # to be trained again, under the edited version
    pinned = (runs / "versions.json").read_bytes()

    def edited_sweep(*extra):
        return subprocess.run(
            histokt_cmd("sweep", SPEC, "--executor", "local", "--no-progress", "--only", "pretrain", *extra),
            cwd=study, env=dict(os.environ, PYTHONPATH=str(edited)), capture_output=True, text=True,
        )  # fmt: skip

    r = edited_sweep()
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "this study runs histokt 0.1.0" in r.stderr and "this sweep would run histokt 0.1.0+edited" in r.stderr
    assert (runs / "versions.json").read_bytes() == pinned and not cell.exists()
    r = edited_sweep("--allow-version-change")
    assert r.returncode == 0, r.stderr
    assert json.loads((cell / "result.json").read_text())["runtime"]["histokt"] == "0.1.0+edited"
    assert [v["identity"]["histokt"] for v in json.loads((runs / "versions.json").read_text())["versions"]] == [
        "0.1.0",
        "0.1.0+edited",
    ]
    assert sweep(study, "--only", "collect").returncode == 0
    report = (runs / "summary" / "report.md").read_text()
    assert "## Mixed versions: these results come from 2 versions" in report
    assert "- histokt 0.1.0+edited, Python" in report and "1 cells: `A-mhist-random-s0`" in report
