"""Everything the batch side asks SLURM or reads from it, in one torch-free place.

    the queue and the configuration   ``squeue``, ``scontrol show config`` (MaxArraySize)
    the submission ledger             ``RUN_ROOT/submissions.jsonl``: which task runs which cell
    the environment of a task         ``SLURM_ARRAY_JOB_ID``, ``SLURM_JOB_ID``, ``SLURM_ARRAY_TASK_ID``, ranks
    the batch script                  submitit's sbatch text (its private ``_make_sbatch_string``, called by
                                      ``sbatch_script`` only) and the teardown lines that requeue a task

Never ``sacct``: accounting is often absent on small clusters, and the queue says what we need.
"""

import getpass
import json
import os
import subprocess
import time
from pathlib import Path

from histokt import atomic
from histokt.errors import UserError
from histokt.lease import current_job

REQUEUE_DIR = ".requeue"  # RUN_ROOT/.requeue/<array job>_<task>: a cell asks the host to requeue its task
DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's own default

# -- the queue and the configuration -----------------------------------------------------------------------------


SQUEUE_TIMEOUT_S = 60


def squeue() -> dict[str, str] | None:
    """{job id or array_task: state} of this user's queued jobs, or None where SLURM cannot be asked."""
    try:
        return own_queue()
    except UserError:
        return None


def own_queue() -> dict[str, str]:
    """{job id or array_task: state} of this user's queued jobs; a UserError where squeue fails or hangs:
    an unanswered query is never "nothing queued" (a sweep would submit cells that still run)."""
    command = ["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i %T"]
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
    except FileNotFoundError:
        raise UserError("squeue: not found; run the sweep on a SLURM login node (or --executor local)") from None
    except subprocess.TimeoutExpired:
        raise UserError(
            f"squeue did not answer in {SQUEUE_TIMEOUT_S} s (the controller is busy or down); nothing was "
            f"submitted: run the same command again later"
        ) from None
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        raise UserError(f"squeue failed ({why}); nothing was submitted: run the same command again later")
    return dict(_two_fields(line) for line in r.stdout.splitlines() if line.strip())


def _two_fields(line: str) -> tuple[str, str]:
    task, state = line.split(None, 1)
    return task, state


def cancel(task: str) -> None:
    """scancel one task (``<array>_<i>`` or a job id); a UserError where scancel fails."""
    try:
        r = subprocess.run(["scancel", task], capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"scancel {task}: {exc}") from None
    if r.returncode != 0:
        raise UserError(f"scancel {task} failed: {(r.stderr.strip().splitlines() or ['no message'])[-1]}")


def partition_nodes(partition: str = "") -> set[str] | None:
    """The nodes of ``partition`` (every partition's where ""), or None where sinfo cannot tell."""
    command = ["sinfo", "-h", "-N", "-o", "%N", *(["-p", partition] if partition else [])]
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(r.stdout.split()) if r.returncode == 0 else None


def exclude_command(task: str, nodes: list[str]) -> list[str]:
    """The scontrol call that keeps a pending task off ``nodes`` (a running one's list cannot change)."""
    return ["scontrol", "update", f"JobId={task}", f"ExcNodeList={','.join(nodes)}"]


def exclude(task: str, nodes: list[str], partition: str = "") -> bool:
    """Keep the pending ``task`` off ``nodes`` where its partition has another node (excluding every node
    would leave it pending forever); True where it was done. A UserError where scontrol refuses."""
    available = partition_nodes(partition)
    if not available or not available - set(nodes):
        return False
    command = exclude_command(task, nodes)
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"{' '.join(command)}: {exc}") from None
    if r.returncode != 0:
        raise UserError(f"{' '.join(command)} failed: {(r.stderr.strip().splitlines() or ['no message'])[-1]}")
    return True


def max_submit_jobs() -> int | None:
    """This user's MaxSubmitJobs (the cap on queued and running jobs, array tasks counted), where sacctmgr
    answers and one is set; None otherwise (no accounting, as on the local cluster)."""
    command = ["sacctmgr", "-n", "-P", "show", "assoc", f"where user={getpass.getuser()}", "format=MaxSubmitJobs"]
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    limits = [int(x) for x in r.stdout.split() if x.strip().isdigit()] if r.returncode == 0 else []
    return min(limits) if limits else None


def max_array_size() -> int:
    """MaxArraySize of the cluster (the highest array index is one less)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"cannot read the SLURM configuration ({exc}); is this a SLURM login node?") from None
    for line in out.splitlines():
        if line.strip().startswith("MaxArraySize"):
            return int(line.split("=")[1])
    return DEFAULT_MAX_ARRAY_SIZE


class Pace:
    """At most ``per_s`` sbatch calls a second after a burst of ``burst`` (a token bucket): a wave of hundreds
    of arrays must not flood the controller, which every user of the cluster shares."""

    def __init__(self, burst: int = 20, per_s: float = 10.0):
        self.tokens, self.burst, self.per_s = float(burst), burst, per_s
        self.last = time.monotonic()

    def wait(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.per_s)
        self.last = now
        if self.tokens < 1:
            time.sleep((1 - self.tokens) / self.per_s)
            self.last = time.monotonic()
            self.tokens = 1.0
        self.tokens -= 1


# -- the submission ledger ---------------------------------------------------------------------------------------


def submissions(run_root) -> list[dict]:
    """Every record of ``RUN_ROOT/submissions.jsonl``, oldest first."""
    path = Path(run_root) / "submissions.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_submission(run_root, record: dict) -> None:
    """Append one JSON line; the whole file is rewritten atomically, so a reader never sees half a line."""
    path = Path(run_root) / "submissions.jsonl"
    old = path.read_text() if path.exists() else ""
    atomic.write_bytes(path, (old + json.dumps(record) + "\n").encode())


def cell_jobs(run_root) -> dict[str, str]:
    """Cell id -> its latest SLURM task id (`<array>_<i>`, or the job id of a one-cell submission), for the
    cells submitted one task each; a cell submitted to a pool since has none (``pool_jobs``)."""
    out: dict[str, str] = {}
    for record in submissions(run_root):
        for i, cell in enumerate(record["cells"]):
            if record.get("workers"):
                out.pop(cell, None)
            else:
                out[cell] = f"{record['job']}_{i}" if record["array"] else record["job"]
    return out


def pool_jobs(run_root) -> dict[str, str]:
    """Cell id -> the job id of the pool of workers it was last submitted to (none where a one-task
    submission came later)."""
    out: dict[str, str] = {}
    for record in submissions(run_root):
        for cell in record["cells"]:
            if record.get("workers"):
                out[cell] = record["job"]
            else:
                out.pop(cell, None)
    return out


def job_of(task: str) -> str:
    """The job of a task id (``<array>_<i>`` -> ``<array>``)."""
    return task.split("_")[0]


def queued_cells(run_root, queue: dict[str, str] | None = None) -> dict[str, str]:
    """Cells whose task, or a worker of whose pool, is still pending or running (never submitted twice):
    cell id -> that task id (``<array>_<i>``, or a job id), or the pool's job id. ``queue``: an answer of
    ``own_queue`` (asked here where not given: a UserError where squeue cannot tell)."""
    queue = own_queue() if queue is None else queue
    if not queue:
        return {}
    jobs = {job_of(t) for t in queue}
    out = {cell: task for cell, task in cell_jobs(run_root).items() if task in queue}
    out.update({cell: job for cell, job in pool_jobs(run_root).items() if job in jobs})
    return out


# -- the environment of a task -----------------------------------------------------------------------------------


def job_key() -> str | None:
    """The name of this task's requeue marker: ``lease.current_job()`` (histokt's one job identity, as SLURM
    spells the task) with a plain job as task 0, `<array job id>_<task id>`, as teardown_lines spells it in
    bash; None outside SLURM."""
    job = current_job()
    return None if job is None else job if "_" in job else f"{job}_0"


def step_tasks() -> int:
    """How many tasks (DDP ranks) the job step of this process has: 1 outside SLURM."""
    return int(os.environ.get("SLURM_NTASKS") or 1)


def is_rank0() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


# -- the batch script --------------------------------------------------------------------------------------------


def submit_command(python: str, folder) -> str:
    """The command of each task, as ``SlurmExecutor._submitit_command_str`` spells it (``python`` already
    quoted: the host's interpreter or the container's ``apptainer exec ... python``)."""
    import shlex

    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(command: str, folder, map_count: int | None, params: dict) -> str:
    """The sbatch file submitit writes for these executor parameters: the only call of submitit's private
    ``_make_sbatch_string`` (pinned submitit==1.5.4; tests/batch/test_submitit.py re-checks it)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=command, folder=folder, map_count=map_count, **params)


def teardown_lines(run_root) -> list[str]:
    """Batch-script lines run on the host after srun: requeue this task if the cell asked for it, else end
    with the cell's exit code."""
    marker = (
        f"{Path(run_root).absolute()}/{REQUEUE_DIR}/${{SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}_${{SLURM_ARRAY_TASK_ID:-0}}"
    )
    key = "${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_${SLURM_ARRAY_TASK_ID:-0}"
    task = "${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}"
    # the job ends with the cell's exit code (srun's, kept before the test below resets $?), so SLURM records
    # a failed cell as FAILED; a task requeued on purpose ends 0
    return [
        "histokt_rc=$?",
        f'if [ -f "{marker}" ]; then rm -f "{marker}"; echo "histokt: requeue {key}"; '
        f'scontrol requeue "{task}" && exit 0; fi',
        'exit "$histokt_rc"',
    ]
