"""Smoke test of the local SLURM cluster (slurm/local/start.sh): a 2-task job array runs both tasks."""

import pytest

from .slurm_cluster import slurm_cluster  # noqa: F401  (pytest fixture)


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_two_task_array_runs_both_tasks(slurm_cluster, tmp_path):  # noqa: F811
    job_id = slurm_cluster.sbatch(
        "--array=0-1",
        "--job-name=histokt-smoke",
        "--time=5",
        f"--output={tmp_path}/out_%A_%a.txt",
        "--wrap", 'echo "task=$SLURM_ARRAY_TASK_ID array=$SLURM_ARRAY_JOB_ID"',
        cwd=tmp_path, wait=True, timeout=180,
    )
    assert job_id.isdigit(), job_id
    for task in (0, 1):
        out = tmp_path / f"out_{job_id}_{task}.txt"
        assert out.is_file(), f"missing {out}; have {sorted(p.name for p in tmp_path.iterdir())}"
        assert out.read_text().strip() == f"task={task} array={job_id}"
