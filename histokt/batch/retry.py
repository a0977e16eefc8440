"""Bounded retries of crashed cells, and the nodes they crashed on.

A crash is a cell's end by an exception that is neither a user error (2), a busy lease (3), a blocked input
(4) nor an interruption (75): a bad GPU, a filesystem hiccup, an NCCL timeout. Each one appends a record to
the cell's ``state.json``::

    "failures": [{"node": "gpu17", "job": "1234_5", "log": ".../1234_5_0_log.out", "error": "...", "time": ..}]

and the cell is retried while it has crashed at most ``max_retries`` times (a stage's resource, default 2;
``HISTOKT_MAX_RETRIES`` in a SLURM task):

- a SLURM array task asks its batch script to requeue it (the preemption's marker, ``slurm.REQUEUE_DIR``);
  a requeued task waits ~30 s (SLURM's requeue delay) or longer for its resources, and every sweep pass
  (``--watch``) sets its ``ExcNodeList`` to the nodes it crashed on while it is pending, where the partition
  has another node (``slurm.exclude``): SLURM cannot change a running job's node list, and a requeue kills
  the batch script that asked for it at once (measured), so the job cannot exclude the nodes itself;
- the local executor submits it again;
- a pool worker never takes a cell again on a node where it crashed (``pool``).

A node where cells of several kinds crashed (``SUSPECT_AFTER`` distinct cells) is listed by ``histokt
status`` as suspect: a broken node keeps taking and failing cells until someone drains it.
"""

import os
import socket
import time

DEFAULT_MAX_RETRIES = 2
SUSPECT_AFTER = 3  # distinct cells crashed on one node


def node() -> str:
    """This process's node, as SLURM names it (``SLURMD_NODENAME``; the host name elsewhere)."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def log_path() -> str | None:
    """The output log of the submitit job this process runs in, or None outside one."""
    try:
        import submitit

        return str(submitit.JobEnvironment().paths.stdout)
    except Exception:  # not in a submitit job (histokt run-cell by hand): no log of ours to name
        return None


def crash_record(error: str, job: str | None) -> dict:
    return {"node": node(), "job": job, "log": log_path(), "error": error, "time": time.time()}


def max_retries() -> int:
    """This task's cap (the stage's ``max_retries``, exported by the batch script), else the default."""
    value = os.environ.get("HISTOKT_MAX_RETRIES")
    return int(value) if value and value.isdigit() else DEFAULT_MAX_RETRIES


def wanted(state: dict) -> bool:
    """A cell whose last end was a crash with tries left (decided when it crashed, ``retry`` in its state):
    to be run again, so not a failed input that blocks the cells reading from it."""
    return state.get("status") == "failed" and bool(state.get("crashed")) and bool(state.get("retry"))


def failed_for_good(state: dict) -> bool:
    """Failed or blocked, and not to be retried: the cells that read from it never will run."""
    return state.get("status") in ("failed", "blocked") and not wanted(state)


def failures(state: dict) -> list[dict]:
    return [f for f in state.get("failures", []) if isinstance(f, dict)]


def crashed_on(state: dict) -> list[str]:
    """The nodes this cell crashed on, in order, once each."""
    return list(dict.fromkeys(f["node"] for f in failures(state) if f.get("node")))


def suspects(states: list[tuple[str, dict]]) -> dict[str, list[str]]:
    """{node: [cell ids that crashed there]} for the nodes where at least ``SUSPECT_AFTER`` cells crashed;
    ``states``: (cell id, its state.json)."""
    by_node: dict[str, set[str]] = {}
    for cell, state in states:
        for n in crashed_on(state):
            by_node.setdefault(n, set()).add(cell)
    return {n: sorted(cells) for n, cells in sorted(by_node.items()) if len(cells) >= SUSPECT_AFTER}
