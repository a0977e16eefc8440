"""Pytest helpers for tests that need a real SLURM cluster (slurm/local/start.sh starts one).

Use in a test module::

    import pytest
    from tests.slurm_cluster import slurm_cluster  # noqa: F401  (pytest fixture)

    @pytest.mark.slurm
    def test_something(slurm_cluster, tmp_path):
        job_id = slurm_cluster.sbatch("--wrap", "true", cwd=tmp_path, wait=True)

Without a cluster the fixture skips with the reason; with ``HISTOKT_REQUIRE_SLURM=1`` it fails instead
(CI jobs that started the cluster set it, so a broken cluster cannot pass as "skipped"). The
``multinode_cluster`` fixture needs two usable nodes (``HISTOKT_SLURM_NODES=2 slurm/local/start.sh``); with
``HISTOKT_REQUIRE_SLURM_NODES=2`` a cluster of fewer fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REQUIRE_ENV = "HISTOKT_REQUIRE_SLURM"
REQUIRE_NODES_ENV = "HISTOKT_REQUIRE_SLURM_NODES"
START_HINT = "start one with: sudo slurm/local/start.sh (see slurm/local/README.md)"
#: node states (sinfo %T) in which the cluster can run jobs; a trailing '*' (not responding) or
#: '+drain' etc. makes a state unusable.
USABLE_STATES = frozenset({"idle", "mixed", "alloc", "allocated", "completing"})


def _probe(timeout: float) -> tuple[bool, str, list[str]]:
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return False, "SLURM not available: 'sinfo' is not on PATH", []
    try:
        proc = subprocess.run(
            [sinfo, "-h", "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return False, f"SLURM not available: 'sinfo -h -o %T' did not answer within {timeout:g} s", []
    except OSError as exc:
        return False, f"SLURM not available: running sinfo failed: {exc}", []
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        return False, f"SLURM not available: sinfo exited {proc.returncode}: {msg[-1] if msg else ''}", []
    states = [s.strip() for s in proc.stdout.split() if s.strip()]
    if not states:
        return False, "SLURM not available: sinfo lists no nodes", states
    if not any(s in USABLE_STATES for s in states):
        return False, f"SLURM not available: no node is idle/mixed/alloc (sinfo states: {', '.join(states)})", states
    return True, f"SLURM available (node states: {', '.join(states)})", states


def slurm_available(timeout: float = 10.0) -> tuple[bool, str]:
    """(True, node states) when ``sinfo`` is on PATH and answers a usable node state (idle, mixed, alloc)
    within ``timeout`` seconds; otherwise (False, why)."""
    ok, reason, _ = _probe(timeout)
    return ok, reason


@dataclass
class SlurmCluster:
    """What the ``slurm_cluster`` fixture returns: the sinfo answer plus small command helpers."""

    states: list[str]
    reason: str

    def run(self, *argv: str, timeout: float = 60.0, check: bool = True, cwd: str | Path | None = None):
        """Run a SLURM command (``sbatch``, ``scontrol`` ...) and return the CompletedProcess."""
        proc = subprocess.run(
            [str(a) for a in argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(map(str, argv))} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def sbatch(self, *args: str, cwd: str | Path, wait: bool = False, timeout: float = 300.0) -> str:
        """``sbatch --parsable [--wait] *args`` in ``cwd``; returns the job id. With ``wait`` it blocks until
        the job (all array tasks) ended and raises if any exited non-zero; on a timeout the job is cancelled."""
        argv = ["sbatch", "--parsable", f"--chdir={cwd}"] + (["--wait"] if wait else []) + [str(a) for a in args]
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            job_id = out.strip().split(";")[0]
            if job_id:
                subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
            raise AssertionError(
                f"sbatch did not finish within {timeout:g} s (job {job_id or '?'} cancelled)"
            ) from None
        job_id = proc.stdout.strip().splitlines()[0].split(";")[0] if proc.stdout.strip() else ""
        if proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {proc.returncode} (job {job_id or '?'})\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return job_id

    def config(self) -> dict[str, str]:
        """``scontrol show config`` as a dict (e.g. ``config()["MaxArraySize"] == "1001"``)."""
        out = self.run("scontrol", "show", "config", timeout=30).stdout
        conf = {}
        for line in out.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() and " " not in key.strip():
                conf[key.strip()] = value.strip()
        return conf


@pytest.fixture(scope="module")
def slurm_cluster() -> SlurmCluster:
    """A running SLURM cluster, or a skip saying why (a failure when HISTOKT_REQUIRE_SLURM=1)."""
    ok, reason, states = _probe(10.0)
    if not ok:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_ENV}=1 requires a cluster; {START_HINT})", pytrace=False)
        pytest.skip(f"{reason}; {START_HINT}")
    return SlurmCluster(states=states, reason=reason)


@pytest.fixture(scope="module")
def multinode_cluster(slurm_cluster: SlurmCluster) -> SlurmCluster:
    """The running cluster where it has at least two usable nodes; a skip (a failure where
    HISTOKT_REQUIRE_SLURM_NODES asks for them) otherwise."""
    states = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%T", timeout=30).stdout.split()  # one line a node
    usable = [s for s in states if s in USABLE_STATES]
    required = int(os.environ.get(REQUIRE_NODES_ENV) or 0)
    if len(usable) < 2:
        why = f"{len(usable)} usable SLURM node(s); multi-node tests need 2: HISTOKT_SLURM_NODES=2 slurm/local/start.sh"
        if required >= 2:
            pytest.fail(f"{why} ({REQUIRE_NODES_ENV}={required})", pytrace=False)
        pytest.skip(why)
    return slurm_cluster
