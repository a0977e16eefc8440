"""The local SLURM cluster (slurm/local/start.sh): a 2-task job array runs both tasks; the README's sbatch example;
on the multi-node cluster, srun -N2 places tasks on two hosts that reach each other over their own network."""

import shlex
import sys

import pytest

from tests.slurm_cluster import multinode_cluster, slurm_cluster  # noqa: F401  (pytest fixtures)


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


# each task: its host name, the address that name resolves to, and whether it reached the other task's host
TWO_HOSTS = r"""
import os, socket, sys, time
name = socket.gethostname()
address = socket.gethostbyname(name)
peer = "{peer}"
ok = "-"
if os.environ["SLURM_PROCID"] == "0":  # serve one connection
    with socket.create_server(("0.0.0.0", 47123)) as server:
        server.settimeout(60)
        conn, (seen, _) = server.accept()
        ok = "served " + socket.gethostbyaddr(seen)[0]
else:
    for _ in range(300):
        try:
            socket.create_connection(("{first}", 47123), timeout=5).close()
            ok = "reached {first}"
            break
        except OSError:
            time.sleep(0.2)
print(os.environ["SLURM_PROCID"], name, address, os.environ["SLURMD_NODENAME"], ok)
"""


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_srun_places_tasks_on_two_hosts_that_reach_each_other(multinode_cluster, tmp_path):  # noqa: F811
    nodes = multinode_cluster.run("sinfo", "-h", "-N", "-o", "%N").stdout.split()
    script = tmp_path / "two_hosts.py"
    script.write_text(TWO_HOSTS.format(first=nodes[0], peer=nodes[1]))
    r = multinode_cluster.run(
        "srun", "-N2", "--ntasks-per-node=1", "-w", ",".join(nodes[:2]), "-t", "3", sys.executable, script, timeout=180
    )
    rows = sorted(line.split(maxsplit=4) for line in r.stdout.splitlines() if line.strip())
    assert [row[0] for row in rows] == ["0", "1"], r.stdout
    (_, host0, addr0, node0, ok0), (_, host1, addr1, node1, ok1) = rows
    assert (host0, host1) == (node0, node1) == tuple(nodes[:2])  # each node under its own host name
    assert addr0 != addr1 and not addr0.startswith("127.") and not addr1.startswith("127."), rows
    assert ok1 == f"reached {nodes[0]}" and ok0 == f"served {nodes[1]}", rows  # over the nodes' own network
    config = multinode_cluster.config()
    # several slurmd on one machine: each its own spool, pid and log file
    assert all("%n" in config[key] for key in ("SlurmdSpoolDir", "SlurmdPidFile", "SlurmdLogFile")), config
