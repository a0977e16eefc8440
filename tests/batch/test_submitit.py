"""submitit, on which the SLURM side rests: the pinned version (we call its private `_make_sbatch_string`), and the
dry run's sbatch scripts equal to what `submitit.SlurmExecutor` really submits for the same stages.

How the real submission is captured: tests/batch/fake_sbatch.py keeps submitit's whole submission path (executor
parameters, the array copy of the executor, the file it writes) and replaces only the `sbatch FILE` command, reading
FILE as it is about to be submitted. That compares what would reach the cluster, without a cluster and without
cancelling anything.
"""

import importlib.metadata
import os
import re
import tomllib
from pathlib import Path

import pytest

from histokt.batch import sweep
from tests.batch import fake_sbatch
from tests.conftest import ROOT

PINNED = "1.5.4"
SPEC = ROOT / "tests" / "fixtures" / "small_study.toml"
RECHECK = (
    "histokt.batch.slurm.sbatch_script calls submitit's private _make_sbatch_string(command, folder, map_count, "
    "**params), and histokt.batch.slurm.submit_command copies SlurmExecutor._submitit_command_str. Re-check both "
    "in submitit/slurm/slurm.py (and how SlurmExecutor._internal_process_submissions copies the executor for an "
    "array), run tests/batch/test_submitit.py, then move the pin in setup.cfg and PINNED here."
)


def test_submitit_is_the_pinned_version():
    pin = re.search(r"^\s*submitit==(\S+)\s*$", (ROOT / "setup.cfg").read_text(), re.M)
    assert pin is not None and pin.group(1) == PINNED, f"setup.cfg no longer pins submitit=={PINNED}. {RECHECK}"
    installed = importlib.metadata.version("submitit")
    assert installed == PINNED, f"submitit {installed} is installed, but histokt is checked against {PINNED}. {RECHECK}"


@pytest.fixture
def study(tmp_path, monkeypatch):
    for d in tomllib.loads(SPEC.read_text())["datasets"].values():  # the spec checks the raw folders exist
        (tmp_path / d["raw"]).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


DEPENDENCY = re.compile(r"^#SBATCH --dependency=.*\n", re.M)


def test_dry_run_scripts_are_what_submitit_submits(study, monkeypatch):
    dry = sweep.sweep(sweep.SweepConfig(spec=SPEC, executor="slurm", dry_run=True))["scripts"]
    fake = fake_sbatch.install(monkeypatch)
    out = sweep.sweep(sweep.SweepConfig(spec=SPEC, executor="slurm", progress=False))
    assert out["status"] == "submitted"
    # (stage, job, cells) of the first array of each stage (one per set of input cells), in stage order
    arrays = list({stage: (stage, job, n) for stage, job, n in reversed(out["arrays"])}.values())[::-1]
    assert (
        [stage for stage, _, _ in arrays]
        == list(dry)
        == ["standardize", "pretrain", "transfer", "merge", "distill", "collect"]
    )
    real = dict(fake.scripts)
    for stage, job, n in arrays:
        submitted = real[job]
        assert ("#SBATCH --array=" in submitted) == (n > 1)
        if stage == "standardize":
            assert submitted == dry[stage]  # byte for byte
        else:  # the dry run cannot know job ids: it says what the array waits for
            record = next(r for r in out["records"] if r["job"] == job)
            assert f"#SBATCH --dependency=afterany:{':'.join(record['after'])}\n" in submitted
            placeholder = "<every array of the study>" if stage == "collect" else "<the tasks of its input cells>"
            assert f"#SBATCH --dependency='afterany:{placeholder}'\n" in dry[stage]
            assert DEPENDENCY.sub("", submitted) == DEPENDENCY.sub("", dry[stage]), stage


def test_the_container_binds_every_path_of_the_study(study, tmp_path):
    """The run root, the store's folder, each raw folder that exists (none inside another: the demo's raw
    folders live beside its store), the node-local folder and staged weights, expanded on the node."""
    spec = sweep.load(SPEC)
    elsewhere = tmp_path / "elsewhere" / "crc"
    elsewhere.mkdir(parents=True)
    spec.datasets["crc"].raw = str(elsewhere)
    spec.datasets["mhist"].raw = str(tmp_path / "purged")  # absent: Apptainer would refuse to bind it
    runs = tmp_path / "runs"
    assert sweep.bind_paths(runs, spec) == sorted([str(elsewhere), str(runs), str(Path(spec.store).absolute().parent)])
    images = tmp_path / "images"
    images.mkdir()
    (images / "h-1234.sif").touch()
    (tmp_path / "h.sif").symlink_to(images / "h-1234.sif")  # as make image links histokt.sif into the checkout
    command = sweep.python_command(str(tmp_path / "h.sif"), runs, spec)
    binds = sorted([*sweep.bind_paths(runs, spec), str(images)])  # the image's real folder: its SIF ID is read
    assert command == (
        f"apptainer exec --nv --bind {','.join(binds)}${{SLURM_TMPDIR:+,$SLURM_TMPDIR}}${{TORCH_HOME:+,$TORCH_HOME}} "
        f"--env PYTHONPATH= {images / 'h-1234.sif'} python -P"
    )
    inside = tmp_path / "runs" / "raw"  # a raw folder inside the run root is bound with it
    inside.mkdir(parents=True)
    spec.datasets["mhist"].raw = str(inside)
    assert str(inside) not in sweep.bind_paths(runs, spec)


@pytest.mark.parametrize(
    "answer,message",
    [
        ('echo "3.12 0.1.0"', r"the image has Python and histokt '3.12 0.1.0', this host '3\.11 "),
        ('echo "Traceback" >&2; echo "ModuleNotFoundError: histokt" >&2; exit 1', r"'ModuleNotFoundError: histokt'"),
    ],
)
def test_an_image_of_another_python_or_histokt_is_refused_before_submitting(study, monkeypatch, answer, message):
    fake = fake_sbatch.install(monkeypatch)
    monkeypatch.setattr(sweep.slurm, "own_queue", lambda: {})
    bin_dir = study / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(f"#!/bin/sh\n{answer}\n")
    (bin_dir / "apptainer").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    image = study / "old.sif"
    image.write_bytes(b"stand-in")
    with pytest.raises(sweep.UserError, match=message):
        sweep.sweep(sweep.SweepConfig(spec=SPEC, executor="slurm", progress=False, container=str(image)))
    assert fake.scripts == []
    with pytest.raises(sweep.UserError, match=r"--container .*/none\.sif: no such image \(make image builds one\)"):
        sweep.check_image(str(study / "none.sif"))
