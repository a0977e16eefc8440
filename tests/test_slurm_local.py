"""The local SLURM cluster (slurm/local/start.sh): a 2-task job array runs both tasks; the README's sbatch example."""

import shlex
import sys

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (pytest fixture)


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_two_task_array_runs_both_tasks(slurm_cluster, tmp_path):  # noqa: F811
    job_id = slurm_cluster.sbatch(
        "--array=0-1",
        "--job-name=histokt-smoke",
        "--time=5",
        f"--output={tmp_path}/out_%A_%a.txt",
        "--wrap",
        'echo "task=$SLURM_ARRAY_TASK_ID array=$SLURM_ARRAY_JOB_ID"',
        cwd=tmp_path,
        wait=True,
        timeout=180,
    )
    assert job_id.isdigit(), job_id
    for task in (0, 1):
        out = tmp_path / f"out_{job_id}_{task}.txt"
        assert out.is_file(), f"missing {out}; have {sorted(p.name for p in tmp_path.iterdir())}"
        assert out.read_text().strip() == f"task={task} array={job_id}"


@pytest.mark.slurm
@pytest.mark.timeout(400)
def test_readme_sbatch_standardize_example(slurm_cluster, tmp_path, monkeypatch):  # noqa: F811
    """The README's 8-task array standardizing PCam into one store, run as shown (paths and the interpreter
    substituted): whichever task finishes last finalizes, and the store equals a one-process run's."""
    from histokt.ingest.standardize import StandardizeConfig, standardize
    from tests.conftest import ROOT
    from tests.fixtures import raw_pcam
    from tests.fixtures.stores import assert_same_store
    from tests.test_readme import README, readme_commands

    raw = raw_pcam.make(tmp_path)
    command = next(c for c in readme_commands(README.read_text()) if c.startswith("sbatch --array=0-7 --wrap"))
    command = (
        command.replace("/data/pcam", str(raw))
        .replace("/scratch/histo.zarr", str(tmp_path / "histo.zarr"))
        .replace("'histokt ", f"'{sys.executable} -m histokt ")
    )
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # sbatch exports the submitting environment to the tasks
    job = slurm_cluster.sbatch(
        *shlex.split(command)[1:],
        "--time=5",
        f"--output={tmp_path}/std_%A_%a.out",
        cwd=tmp_path,
        wait=True,
        timeout=360,
    )
    logs = [(tmp_path / f"std_{job}_{i}.out").read_text() for i in range(8)]
    assert sum("wrote" in log for log in logs) == 1, logs  # exactly one task finalized the dataset
    standardize(StandardizeConfig(dataset="pcam", raw=raw, store=tmp_path / "one.zarr", progress=False))
    assert_same_store(tmp_path / "histo.zarr" / "pcam", tmp_path / "one.zarr" / "pcam")
