"""`histokt sweep --rehearse`: the whole plan through the same path as a real study, with cells that do no
work; failures where the real cells would fail (a raw folder absent) or where planted, and everything that
reads from them blocked. The rehearsal at full size on the local cluster is benchmarks/rehearse.py."""

import json
import re
import tomllib
from pathlib import Path

import pytest

from histokt import cli
from histokt.batch import rehearse, sweep
from histokt.errors import UserError
from histokt.study import plan
from tests.conftest import ROOT

SPEC = ROOT / "tests" / "fixtures" / "small_study.toml"


@pytest.fixture
def study(tmp_path, monkeypatch):
    for d in tomllib.loads(SPEC.read_text())["datasets"].values():
        (tmp_path / d["raw"]).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def states(run_root: Path) -> dict[str, str]:
    """Each cell's end: done (its marker), else the status its state.json records."""
    out = {}
    for cells in plan.read(run_root).values():
        for c in cells:
            state = json.loads((plan.cell_dir(run_root, c) / "state.json").read_text())
            out[c.id] = "done" if plan.is_done(run_root, c) else state["status"]
    return out


def test_a_rehearsal_runs_every_cell_and_trains_nothing(study, capsys):
    (study / "demo" / "raw" / "mhist").rmdir()  # not downloaded yet: its standardize cell fails, as for real
    code = cli.main(
        ["sweep", str(SPEC), "--rehearse", "--rehearse-fail", "A-crc-*, M-*", "--parallel", "1", "--no-progress"]
    )
    assert code == 1
    run_root = study / "demo" / "runs-rehearsal"  # the spec's run root, marked: never the real one
    assert "rehearsal finished with failures" in capsys.readouterr().out
    assert not (study / "demo" / "runs").exists() and not (study / "demo" / "store.zarr").exists()
    got = states(run_root)
    assert got == {
        "std-crc-0of2": "done",
        "std-crc-1of2": "done",
        "std-mhist-0of1": "failed",
        "A-crc-random-s0": "failed",  # planted
        "A-mhist-random-s0": "blocked",  # by its store
        "B-random-crc-mhist-deep-lr1e-3-s0": "blocked",
        "B-random-mhist-crc-deep-lr1e-3-s0": "blocked",
        "M-random-crc+mhist-kg-select-s0": "blocked",  # its inputs fail before its planted failure can
        "D-random-crc+mhist-kg-select-mhist-lr1e-3-s0": "blocked",
        "collect": "done",
    }
    crc = plan.cell_dir(run_root, plan.read(run_root)["pretrain"][0])
    assert json.loads((crc / "state.json").read_text())["error"] == (
        "rehearsal: cell A-crc-random-s0 fails as planted (--rehearse-fail A-crc-*)"
    )
    mhist = json.loads((run_root / "cells" / "standardize" / "std-mhist-0of1" / "state.json").read_text())
    assert "no such folder" in mhist["error"]
    report = json.loads((run_root / "cells" / "collect" / "collect" / "done.json").read_text())
    assert report["rehearsal"] is True
    assert report["cells"]["transfer"] == {"done": 0, "failed": 0, "blocked": 2, "other": 0}
    assert report["cells"]["standardize"] == {"done": 2, "failed": 1, "blocked": 0, "other": 0}


def test_a_rehearsal_writes_what_later_cells_read_and_a_rerun_finds_it_done(study):
    out = sweep.sweep(sweep.SweepConfig(spec=SPEC, rehearse=True, parallel=1, progress=False))
    run_root = Path(out["run_root"])
    assert out["status"] == "finished" and set(states(run_root).values()) == {"done"}
    # the files the next cells read, empty; the markers say it was a rehearsal
    assert (run_root / "cells" / "pretrain" / "A-crc-random-s0" / "best.pt").read_bytes() == b""
    assert (run_root / "cells" / "merge" / "M-random-crc+mhist-kg-select-s0" / "merged.pt").exists()
    assert json.loads((run_root / "cells" / "pretrain" / "A-crc-random-s0" / "result.json").read_text()) == {
        "rehearsal": True
    }
    assert not (run_root / "cells" / "transfer" / "B-random-crc-mhist-deep-lr1e-3-s0" / "best.pt").exists()
    again = sweep.sweep(sweep.SweepConfig(spec=SPEC, rehearse=True, parallel=1, progress=False))
    assert again["status"] == "nothing to do"


def test_a_rehearsal_and_a_real_study_never_share_a_run_root(study):
    runs = study / "runs"
    sweep.sweep(sweep.SweepConfig(spec=SPEC, run_root=runs, only="collect", progress=False))  # a real plan
    with pytest.raises(UserError, match=r"runs: holds a real study; a rehearsal needs a run root of its own"):
        sweep.sweep(sweep.SweepConfig(spec=SPEC, run_root=runs, rehearse=True, progress=False))
    assert not (runs / rehearse.MARKER).exists()
    rehearsal = study / "rehearsal"
    sweep.sweep(sweep.SweepConfig(spec=SPEC, run_root=rehearsal, rehearse=True, only="collect", progress=False))
    with pytest.raises(UserError, match=r"rehearsal: is a rehearsal's run root \(its cells did no work\)"):
        sweep.sweep(sweep.SweepConfig(spec=SPEC, run_root=rehearsal, dry_run=False, progress=False))
    assert cli.main(["sweep", str(SPEC), "--rehearse-fail", "A-*"]) == 2  # only with --rehearse


def test_outputs_are_the_files_other_cells_read(study):
    spec_run = sweep.prepare(sweep.SweepConfig(spec=SPEC, rehearse=True))
    run_root, cells = spec_run[1], spec_run[2]
    a = plan.cell_dir(run_root, cells["pretrain"][0])
    assert rehearse.outputs(run_root, cells, a) == [a / "best.pt"]
    std = plan.cell_dir(run_root, cells["standardize"][0])
    assert rehearse.outputs(run_root, cells, std) == []  # its done.json is the marker, written last


def test_crashed_cells_are_retried_up_to_max_retries(study, capsys):
    """A cell that crashes on its first tries finishes on a later one; one that always crashes stops after
    max_retries (2: three tries) and blocks what reads from it; status counts the crashes, names the logs
    and the node where three cells crashed."""
    crash = "std-crc-1of2:2,A-crc-*:1,A-mhist-*"
    code = cli.main(["sweep", str(SPEC), "--rehearse", "--rehearse-crash", crash, "--parallel", "1", "--no-progress"])
    assert code == 1
    run_root = study / "demo" / "runs-rehearsal"
    got = states(run_root)
    assert {c for c, s in got.items() if s != "done"} == {
        "A-mhist-random-s0",
        "B-random-mhist-crc-deep-lr1e-3-s0",
        "M-random-crc+mhist-kg-select-s0",
        "D-random-crc+mhist-kg-select-mhist-lr1e-3-s0",
    }
    assert got["A-mhist-random-s0"] == "failed" and got["M-random-crc+mhist-kg-select-s0"] == "blocked"
    tries = {}
    for cells in plan.read(run_root).values():
        for c in cells:
            state = json.loads((plan.cell_dir(run_root, c) / "state.json").read_text())
            if state.get("failures"):
                tries[c.id] = (len(state["failures"]), state["attempts"], state["retry"])
                assert all(Path(f["log"]).is_file() for f in state["failures"]), c.id  # the log of each try
    assert tries == {"std-crc-1of2": (2, 3, True), "A-crc-random-s0": (1, 2, True), "A-mhist-random-s0": (3, 3, False)}
    capsys.readouterr()
    assert cli.main(["status", str(run_root)]) == 0
    out = capsys.readouterr().out
    assert "crashed 3 time(s), not retried again (max_retries): pretrain/A-mhist-random-s0 on " in out
    assert "crashed 2 time(s), retried, done: standardize/std-crc-1of2 on " in out
    line = next(x for x in out.splitlines() if "A-crc-random-s0 on" in x)
    assert line.count("_log.out") == 1 and line.startswith("crashed 1 time(s), retried, done")
    assert re.search(
        r"suspect node \S+: 3 cells crashed there \(A-crc-random-s0, A-mhist-random-s0, std-crc-1of2\)", out
    )
