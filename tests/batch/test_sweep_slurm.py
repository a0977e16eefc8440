"""`histokt sweep --executor slurm` on the real single-node cluster (slurm/local/start.sh): the demo study as
job arrays, one task preempted with SIGTERM mid-training that requeues and resumes to the uninterrupted result,
a failing cell that does not stop the collector, a re-run that submits only what is missing, then nothing."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from histokt import provenance
from histokt.batch.demo import write_collection
from histokt.train import checkpoint
from tests.conftest import ROOT, histokt_cmd
from tests.container_image import image  # noqa: F401  (fixture)
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (fixture)

SPEC = ROOT / "tests" / "fixtures" / "small_study.toml"
pytestmark = pytest.mark.slurm


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT))


def sweep(cwd, spec=SPEC, *options):
    node_local = Path(cwd) / "node-local"  # the site's $SLURM_TMPDIR: every training cell stages its data there
    node_local.mkdir(exist_ok=True)
    r = subprocess.run(
        histokt_cmd("sweep", spec, "--executor", "slurm", *options),
        cwd=cwd,
        env={**env(), "SLURM_TMPDIR": str(node_local)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def wait_until(predicate, what, timeout=900):
    """Poll the run root for a condition; SLURM's requeue hold makes this take minutes, not seconds."""
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, f"timed out after {timeout} s waiting for {what}"
        time.sleep(1)


def queue_empty_for(run_root: Path) -> bool:
    from histokt.batch.slurm import queued_cells

    return not queued_cells(run_root)


def state(cell_dir: Path) -> dict:
    try:
        return json.loads((cell_dir / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def same_as_uninterrupted(cell: Path, ref: Path) -> bool:
    """Whether a (resumed) pretrain cell's best weights equal those of an uninterrupted `histokt train` of the
    same configuration, on one thread as its task had."""
    config = json.loads((cell / "config.json").read_text())
    args = [
        "train",
        "--store",
        config["store"],
        "--dataset",
        config["dataset"],
        "--out",
        ref,
        "--epochs",
        config["epochs"],
        "--batch-size",
        config["batch_size"],
        "--workers",
        "0",
        "--optimizer",
        config["optimizer"],
        "--lr",
        config["lr"],
        "--eval-batch-size",
        config["eval_batch_size"],
        "--no-progress",
    ]
    r = subprocess.run(
        histokt_cmd(*map(str, args)), env={**env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    a, b = checkpoint.load(cell / "best.pt")["model"], checkpoint.load(ref / "best.pt")["model"]
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("where", ["host", "image"])
def test_demo_study_on_slurm(slurm_cluster, tmp_path, request, where):  # noqa: F811
    """On the host, and inside the real image (every cell through `apptainer exec`: the cell preempted with
    USR2 checkpoints inside the container, the host's teardown requeues it, it resumes to the same weights as
    an uninterrupted run on the host)."""
    options = ("--container", str(request.getfixturevalue("image"))) if where == "image" else ()
    write_collection(tmp_path / "demo", per_class=4, seed=0)
    annotations = tmp_path / "demo" / "raw" / "mhist" / "annotations.csv"
    good = annotations.read_text()
    annotations.write_text("Image Name,Partition\n")  # a broken download: mhist's cells fail
    # Pretraining long enough (40 steps) that the poll below sees it running with a checkpoint and the
    # signal reaches it mid-training: with the small study's 2 epochs (4 steps, ~2 s on a quiet machine)
    # the cell could finish between two polls.
    text = SPEC.read_text()
    assert text.count("epochs = 2\n") == 1  # the pretrain recipe's
    spec = tmp_path / "study.toml"
    spec.write_text(text.replace("epochs = 2\n", "epochs = 20\n"))
    out = sweep(tmp_path, spec, *options)
    assert "submitted standardize" in out and "submitted collect" in out
    runs = tmp_path / "demo" / "runs"
    crc = runs / "cells" / "pretrain" / "A-crc-random-s0"

    # preempt the crc pretraining task once it has checkpointed a step, with SIGTERM to its tasks (as a
    # preempting cluster's grace time, or scancel --signal=TERM, sends it; USR2, the time limit's signal, takes
    # the same path in the cell): the cell checkpoints, exits 75, and the batch script's teardown requeues it
    wait_until(lambda: (crc / "last.pt").exists() and state(crc).get("status") == "running", "A-crc to train")
    from histokt.batch.slurm import cell_jobs

    task = cell_jobs(runs)["A-crc-random-s0"]
    # SIGTERM on the host (a preemption's grace time), USR2 in the image (the time limit's warning): one path
    subprocess.run(["scancel", f"--signal={'USR2' if options else 'TERM'}", task], check=True)
    wait_until(
        lambda: state(crc).get("status") == "interrupted" or (crc / "result.json").exists(), "the checkpoint-and-exit"
    )
    # state.json, not last.pt: the requeued task may already have finished and dropped last.pt
    wait_until(lambda: state(crc).get("interrupted_at_steps"), "the interruption to be recorded")
    interrupted_at = state(crc)["interrupted_at_steps"][0]
    wait_until(
        lambda: (runs / "cells" / "collect" / "collect" / "done.json").exists() and queue_empty_for(runs),
        "the study to finish",
    )

    s = state(crc)
    assert (crc / "result.json").exists() and s["attempts"] == 2, s
    assert s["container"] == (options[1] if options else None), s
    ran = json.loads((crc / "result.json").read_text())["runtime"]["container"]
    assert ran == ({"image": options[1], "sif_id": provenance.sif_id(options[1])} if options else None), ran
    assert not options or ran["sif_id"]  # a real SIF: its build's ID
    assert interrupted_at < json.loads((crc / "result.json").read_text())["steps"]
    # the resumed result equals an uninterrupted run of the same cell, on the same threads
    assert same_as_uninterrupted(crc, tmp_path / "uninterrupted")

    # the cells read their data from a node-local copy ($SLURM_TMPDIR), removed when its last user left
    logs = "".join(p.read_text(errors="replace") for p in runs.glob("submitit/*/*.out"))
    assert "histokt: staged crc to " in logs
    assert not any((tmp_path / "node-local" / "histokt-stage").iterdir())

    report = (runs / "summary" / "report.md").read_text()
    # the report lists training cells: mhist's, blocked, each naming the failed cell that blocks it
    assert "A-mhist-random-s0" in report and "blocked by standardize/std-mhist-0of1" in report
    status = subprocess.run(histokt_cmd("status", runs), env=env(), capture_output=True, text=True).stdout
    assert "failed standardize/std-mhist-0of1" in status
    # SLURM's own record agrees: the failed cell's task ended FAILED with the cell's exit code (2: a user
    # error), not COMPLETED (no accounting on the local cluster: scontrol keeps it for MinJobAge)
    record = subprocess.run(
        ["scontrol", "show", "job", cell_jobs(runs)["std-mhist-0of1"]], capture_output=True, text=True
    ).stdout
    assert "JobState=FAILED" in record and "ExitCode=2:0" in record, record
    # its dependants never trained: each started (afterany on its one input task), found its input missing
    # and ended at once with exit code 4, blocked, naming the failed cell
    mhist = runs / "cells" / "pretrain" / "A-mhist-random-s0"
    assert state(mhist)["blocked_by"] == "standardize/std-mhist-0of1" and not (mhist / "config.json").exists()
    assert "blocked pretrain/A-mhist-random-s0: blocked by standardize/std-mhist-0of1" in status
    record = subprocess.run(
        ["scontrol", "show", "job", cell_jobs(runs)["A-mhist-random-s0"]], capture_output=True, text=True
    ).stdout
    assert "JobState=FAILED" in record and "ExitCode=4:0" in record, record
    assert "preempted 1 time(s), 1 cell(s)" in status

    # fix the download: a re-run submits only the cells that are not done
    annotations.write_text(good)
    out = sweep(tmp_path, spec, *options)
    assert "pretrain          1 to run of      2 cells" in out and "standardize       1 to run of      3" in out
    wait_until(
        lambda: (
            queue_empty_for(runs)
            and (runs / "cells" / "transfer" / "B-random-mhist-crc-deep-lr1e-3-s0" / "result.json").exists()
        ),
        "the missing cells",
    )
    wait_until(lambda: queue_empty_for(runs), "the collector")
    assert "nothing to do" in sweep(tmp_path, spec, *options)


def test_arrays_are_cut_below_max_array_size(slurm_cluster, tmp_path, monkeypatch):  # noqa: F811
    import histokt.batch.sweep as sweep_module
    from histokt.batch import slurm
    from histokt.batch.slurm import submissions
    from histokt.batch.sweep import SweepConfig

    write_collection(tmp_path / "demo", per_class=4, seed=0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(slurm, "max_array_size", lambda: 3)  # a cluster allowing indices 0..2
    out = sweep_module.sweep(SweepConfig(spec=SPEC, executor="slurm", progress=False))
    records = submissions(Path(out["run_root"]))
    try:
        by_stage = {}
        for r in records:
            by_stage.setdefault(r["stage"], []).append(len(r["cells"]))
        assert by_stage == {
            "standardize": [2, 1],
            "pretrain": [1, 1],  # one array per set of input tasks: crc's store, mhist's store
            "transfer": [1, 1],
            "merge": [1],
            "distill": [1],
            "collect": [1],
        }
        queue = slurm.squeue()
        deps = subprocess.run(["squeue", "-h", "-o", "%i %E"], capture_output=True, text=True).stdout
        crc_pretrain = next(r["job"] for r in records if r["cells"] == ["A-crc-random-s0"])
        crc_store, mhist_store = (r["job"] for r in records if r["stage"] == "standardize")
        line = next(x for x in deps.splitlines() if x.startswith(crc_pretrain))
        # it waits for the two tasks that standardize crc, and for nothing of mhist's
        assert f"afterany:{crc_store}_0" in line and f"afterany:{crc_store}_1" in line, line
        assert mhist_store not in line, line
        assert queue is not None
    finally:
        subprocess.run(["scancel", *[r["job"] for r in records]], check=False)


def test_container_wraps_every_task(slurm_cluster, tmp_path, monkeypatch):  # noqa: F811
    """--container runs each task as `apptainer exec --nv --bind ... IMG python ...`. A stand-in apptainer
    (no Apptainer here) logs its arguments and runs the command with no SLURM tools on PATH, as in an image."""
    write_collection(tmp_path / "demo", per_class=4, seed=0)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apptainer.log"
    fake = bin_dir / "apptainer"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$@" >> {log}\n'
        '[ "$1" = exec ] || exit 64\n'
        "shift\n"
        'while [ "${1#-}" != "$1" ]; do case "$1" in --bind|--env) shift 2;; *) shift;; esac; done\n'
        "image=$1; shift\n"
        '[ -f "$image" ] || { echo "no image $image" >&2; exit 65; }\n'
        f'exec env PATH=/nonexistent {Path(__import__("sys").executable).parent}/"$@"\n'
    )
    fake.chmod(0o755)
    stand_in_image = tmp_path / "histokt.sif"
    stand_in_image.write_bytes(b"stand-in")
    node_local = tmp_path / "node-local"  # the site's $SLURM_TMPDIR: bound into the container too
    node_local.mkdir()
    run_env = {**env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_TMPDIR": str(node_local)}
    r = subprocess.run(
        histokt_cmd("sweep", SPEC, "--executor", "slurm", "--only", "standardize", "--container", stand_in_image),
        cwd=tmp_path,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    runs = tmp_path / "demo" / "runs"
    wait_until(lambda: queue_empty_for(runs), "the standardize tasks")
    cells = runs / "cells" / "standardize"
    assert all((cells / c / "done.json").exists() for c in ("std-crc-0of2", "std-crc-1of2", "std-mhist-0of1"))
    probes = [c for c in log.read_text().splitlines() if " -c " in c]  # the sweep's check of the image
    assert len(probes) == 1 and "histokt.__version__" in probes[0]
    calls = [c for c in log.read_text().splitlines() if c not in probes]
    assert len(calls) == 3
    wrapped = f"--env PYTHONPATH= {stand_in_image} python -P -u -m submitit.core._submit"
    assert all(c.startswith("exec --nv --bind ") and wrapped in c for c in calls)
    assert str(runs) in calls[0]
    assert all(c.split()[3].endswith(f",{node_local}") for c in calls), calls  # --bind a,b,$SLURM_TMPDIR


def test_a_study_larger_than_the_queue_budget_completes_with_one_command(slurm_cluster, tmp_path):  # noqa: F811
    """max_queued = 4: `histokt sweep --watch` submits wave after wave as the queue drains, and at no moment
    are more than 4 of the study's tasks queued or running (sampled from squeue while it runs, and checked
    from the log of submissions)."""
    import threading

    from histokt.batch.slurm import cell_jobs, submissions

    write_collection(tmp_path / "demo", per_class=4, seed=0)
    runs = tmp_path / "demo" / "runs"
    seen: list[int] = []
    done = threading.Event()

    def sample():  # this study's tasks in the queue, as squeue lists them
        while not done.is_set():
            tasks = set(cell_jobs(runs).values()) if (runs / "submissions.jsonl").exists() else set()
            listed = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True).stdout.split()
            seen.append(len(tasks & set(listed)))
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        r = subprocess.run(
            histokt_cmd("sweep", SPEC, "--executor", "slurm", "--max-queued", "4", "--watch", "--watch-interval", "2"),
            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
    finally:
        done.set()
        sampler.join()
    assert r.returncode == 0, r.stdout + r.stderr
    assert (runs / "cells" / "collect" / "collect" / "done.json").exists()
    assert max(seen) <= 4 and max(seen) >= 2, seen
    records = submissions(runs)
    assert len(records) >= 3  # several waves
    assert all(r["queued_before"] + len(r["cells"]) <= 4 for r in records), records
    assert "nothing to do" in sweep(tmp_path)


def test_cells_run_inside_the_real_image(slurm_cluster, image, tmp_path):  # noqa: F811
    """--container with the image containers/build.sh built: every task is `apptainer exec ... python` around
    the image's own Python and histokt, in real array tasks; each cell's state.json names the image."""
    write_collection(tmp_path / "demo", per_class=4, seed=0)
    r = subprocess.run(
        histokt_cmd("sweep", SPEC, "--executor", "slurm", "--only", "standardize", "--container", image),
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    runs = tmp_path / "demo" / "runs"
    wait_until(lambda: queue_empty_for(runs), "the standardize tasks")
    for cell in ("std-crc-0of2", "std-crc-1of2", "std-mhist-0of1"):
        directory = runs / "cells" / "standardize" / cell
        assert (directory / "done.json").exists(), state(directory)
        assert state(directory)["container"] == str(image), state(directory)
    assert (tmp_path / "demo" / "store.zarr" / "crc").is_dir()


def test_a_crashed_task_is_requeued_and_retried_by_slurm(slurm_cluster, tmp_path):  # noqa: F811
    """A rehearsal on the real cluster, max_retries 1: a cell crashing on its first try is requeued by its
    batch script (the same task, no new submission) and finishes, and the cells reading from it wait for
    the retry (they are done, not blocked); one that always crashes ends failed after two tries; status names
    each try's log."""
    from histokt.batch.slurm import submissions

    spec = tmp_path / "retry.toml"
    spec.write_text(SPEC.read_text().replace("time_min = 20\n", "time_min = 20\nmax_retries = 1\n", 1))
    for d in ("crc", "mhist"):
        (tmp_path / "demo" / "raw" / d).mkdir(parents=True)
    r = subprocess.run(
        histokt_cmd("sweep", spec, "--executor", "slurm", "--rehearse", "--rehearse-crash", "A-crc-*:1,A-mhist-*",
                    "--watch", "--watch-interval", "2"),
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    runs = tmp_path / "demo" / "runs-rehearsal"
    crc, mhist = (
        state(runs / "cells" / "pretrain" / "A-crc-random-s0"),
        state(runs / "cells" / "pretrain" / "A-mhist-random-s0"),
    )
    assert crc["status"] == "done" and len(crc["failures"]) == 1 and crc["attempts"] == 2
    assert mhist["status"] == "failed" and len(mhist["failures"]) == 2 and mhist["retry"] is False
    assert mhist["failures"][0]["job"] == mhist["failures"][1]["job"]  # the same task, requeued
    from histokt.batch.slurm import partition_nodes

    if len(partition_nodes() or ()) >= 2:  # the two-node cluster: the watching sweep kept the retry off its node
        assert mhist["failures"][0]["node"] != mhist["failures"][1]["node"], mhist["failures"]
        assert crc["failures"][0]["node"] in partition_nodes()
    assert sum("A-mhist-random-s0" in rec["cells"] for rec in submissions(runs)) == 1  # never resubmitted
    assert (runs / "cells" / "transfer" / "B-random-crc-mhist-deep-lr1e-3-s0" / "result.json").exists()
    assert state(runs / "cells" / "transfer" / "B-random-mhist-crc-deep-lr1e-3-s0")["status"] == "blocked"
    status = subprocess.run(histokt_cmd("status", runs), env=env(), capture_output=True, text=True).stdout
    line = next(x for x in status.splitlines() if "pretrain/A-mhist-random-s0 on" in x)
    assert line.startswith("crashed 2 time(s), not retried again (max_retries)")
    logs = line.split("logs: ")[1].split(", ")
    assert len(logs) == 2 and all(Path(p).is_file() for p in logs), logs
    assert "crashes as planted on try 2" in Path(logs[1]).read_text()


def test_a_preempted_worker_requeues_and_its_cell_resumes_exactly(slurm_cluster, tmp_path):  # noqa: F811
    """--pool 1: one worker takes every cell; USR2 while it trains A-crc: the cell checkpoints, the worker
    asks for a requeue and ends, SLURM requeues it, and the worker takes up the cell again, which resumes to
    the weights of an uninterrupted run; no cell finished before the signal runs again. `histokt status`
    names the worker and the cell it runs."""
    from histokt.batch.slurm import submissions

    write_collection(tmp_path / "demo", per_class=4, seed=0)
    spec = tmp_path / "study.toml"
    spec.write_text(SPEC.read_text().replace("epochs = 2\n", "epochs = 20\n"))  # long enough to be caught
    out = sweep(tmp_path, spec, "--pool", "1")
    assert "submitted pool cpu" in out
    runs = tmp_path / "demo" / "runs"
    (record,) = submissions(runs)
    assert record["workers"] == 1 and len(record["cells"]) == 10
    crc = runs / "cells" / "pretrain" / "A-crc-random-s0"
    wait_until(lambda: (crc / "last.pt").exists() and state(crc).get("status") == "running", "A-crc to train")
    status = subprocess.run(histokt_cmd("status", runs), env=env(), capture_output=True, text=True).stdout
    assert f"worker {record['job']}_0 (pool cpu) on " in status and ": runs A-crc-random-s0; " in status, status
    done_before = {p.parent.name: p.stat().st_mtime for p in runs.glob("cells/*/*/done.json")}
    subprocess.run(["scancel", "--signal=USR2", record["job"]], check=True)
    wait_until(lambda: state(crc).get("interrupted_at_steps"), "the interruption to be recorded")
    wait_until(
        lambda: (runs / "cells" / "collect" / "collect" / "done.json").exists() and queue_empty_for(runs),
        "the study to finish",
    )
    s = state(crc)
    assert (crc / "result.json").exists() and s["attempts"] == 2, s
    assert s["interrupted_at_steps"][0] < json.loads((crc / "result.json").read_text())["steps"]
    assert same_as_uninterrupted(crc, tmp_path / "uninterrupted")
    assert done_before and all(
        (runs / "cells" / "standardize" / c / "done.json").stat().st_mtime == t for c, t in done_before.items()
    )
    others = [p for p in runs.glob("cells/*/*/state.json") if p.parent != crc]
    assert len(others) == 9 and all(json.loads(p.read_text())["attempts"] == 1 for p in others)
    log = (runs / "submitit" / f"{record['job']}" / f"{record['job']}_0_log.out").read_text(errors="replace")
    assert f"histokt: requeue {record['job']}_0" in log
