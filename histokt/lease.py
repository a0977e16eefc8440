"""Leases: "this piece of work is mine" as one small file, safe on a shared cluster filesystem.

The contract (any user: a standardize part, the finalize step, later a training cell per job):

- A lease is a file, e.g. ``parts/p000003.lease``. It appears whole: the taker writes a temporary file
  beside it that already holds its owner, then hard-links it to the lease's name. ``os.link`` fails when
  the name exists, so exactly one taker wins, and nobody ever reads a half-written (empty) lease.
- Its text is one line ``HOST PID STARTED [JOB]``: the host name, the process id, the time it was taken
  (informative only) and, inside SLURM, the job as SLURM spells the task (``current_job()``: ``123_4`` for
  an array task, ``123`` for a plain job, as squeue, scancel and scontrol take it); ``holder(path)`` renders
  it for messages: "host h, pid p, job j, 12 s ago".
- The heartbeat is the file's mtime: the holder refreshes it with ``Lease.touch()`` (or a background
  ``with lease.beating():``) more often than the stale age, and the age in messages is measured from it.
- Staleness, decided by the next taker: a lease of this host whose process is dead (gone, or a zombie
  not yet reaped) is stale at once, however young; a lease of this host whose process lives is never
  stale, however old (its holder may be slow, not dead); a lease of another host (whose processes cannot
  be checked) is stale when its heartbeat is older than ``stale_after`` seconds; an unreadable lease
  (which this module never writes) is stale. A stale lease is removed and taken: its holder's unfinished
  work is the taker's to redo.
- One taker per job (``one_per_job=True``, for a user where only one process of a SLURM job ever takes the
  lease, e.g. rank 0 of a training cell): a lease of the taker's own job held on another host is stale at
  once. SLURM runs one instance of a job at a time, so it was left by an earlier run of the job, killed
  before it could release it (a node failure, then a requeue onto another node); without this rule the
  requeued job would find its own lease "held" for ``stale_after`` seconds.
- ``release()`` removes the lease only while it is still this holder's (a lease taken over after this
  process stalled is left to its new holder); ``touch()`` says whether it still is.

Known limits: two takers judging the same stale lease at the same instant may both win (the window is
between reading it and linking); a pid reused by an unrelated process of the same host keeps a dead
holder's lease alive until that process ends. Neither can corrupt work that is verified on completion.
With ``one_per_job``, a node cut off from the controller but still running its job when SLURM requeues
that job elsewhere keeps writing until slurmd kills it.
"""

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

DEFAULT_STALE_S = 600.0  # a lease of another host whose heartbeat is this old belongs to a dead process


class Holder(NamedTuple):
    """Who holds a lease, as read from its file."""

    host: str
    pid: int
    started: float
    job: str | None
    heartbeat: float  # the file's mtime

    def who(self) -> str:
        job = f", job {self.job}" if self.job else ""
        return f"host {self.host}, pid {self.pid}{job}"

    def describe(self, now: float | None = None) -> str:
        age = max(0.0, (time.time() if now is None else now) - self.heartbeat)
        return f"{self.who()}, {age:.0f} s ago"


def current_job() -> str | None:
    """The SLURM task this process runs in, as SLURM spells it (squeue's ``%i``, scancel, scontrol requeue):
    ``ARRAYJOB_TASK`` for an array task, the job id otherwise; None outside SLURM. Every process of one job
    step (the ranks of a DDP cell) has the same. histokt's one job identity: leases, a cell's state.json and
    (with ``_0`` for a plain job) the name of a task's requeue marker (histokt.batch.slurm.job_key)."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or env.get("SLURM_ARRAY_JOB_ID") or None


def read(path) -> Holder | None:
    """The holder of the lease at ``path``; None where it is absent or unreadable."""
    path = Path(path)
    try:
        text = path.read_text()
        heartbeat = path.stat().st_mtime
    except (FileNotFoundError, NotADirectoryError):
        return None
    fields = text.split()
    if len(fields) not in (3, 4):
        return None
    try:
        return Holder(fields[0], int(fields[1]), float(fields[2]), fields[3] if len(fields) == 4 else None, heartbeat)
    except ValueError:
        return None


def holder(path) -> str:
    """The lease's holder for a message ("host h, pid p, job j, 12 s ago"), or "released" where there is none."""
    h = read(path)
    if h is not None:
        return h.describe()
    return "released" if not Path(path).exists() else "unreadable lease"


def alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists and has not ended: a zombie (ended, not yet reaped by its
    parent, e.g. for the second or so after a whole process group was killed) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether /proc says that ``pid`` has ended (Z zombie, X dead); False where /proc cannot tell (not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"])


def is_stale(path, stale_after: float = DEFAULT_STALE_S) -> bool:
    """Whether the lease at ``path`` may be taken over (the rules are in the module docstring)."""
    h = read(path)
    if h is None:
        return True
    if h.host == socket.gethostname():
        return not alive(h.pid)
    return time.time() - h.heartbeat > stale_after


def live(path, stale_after: float = DEFAULT_STALE_S) -> Holder | None:
    """The holder of the lease at ``path`` where it is held and not stale, else None."""
    h = read(path)
    return None if h is None or is_stale(path, stale_after) else h


def left_by_an_earlier_run(path) -> bool:
    """Whether the lease at ``path`` names this process's own SLURM job on another host: where one process
    per job takes it (``one_per_job``), an earlier run of this job left it before a requeue."""
    h = read(path)
    return h is not None and h.job is not None and h.job == current_job() and h.host != socket.gethostname()


class Lease:
    """A lease this process holds; get one with ``Lease.acquire``."""

    def __init__(self, path: Path, text: str, stale_after: float):
        self.path = path
        self.text = text
        self.stale_after = stale_after

    @classmethod
    def acquire(cls, path, *, stale_after: float = DEFAULT_STALE_S, one_per_job: bool = False) -> "Lease | None":
        """Take the lease at ``path``, or None where a live holder has it. A stale lease is taken over
        (``one_per_job``: see the module docstring). The folder must exist (FileNotFoundError otherwise: the
        work it guarded may be gone)."""
        path = Path(path)
        job = current_job()
        text = f"{socket.gethostname()} {os.getpid()} {time.time():.0f}" + (f" {job}" if job else "") + "\n"
        mine = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}")
        try:
            mine.write_text(text)
            for _ in range(2):  # one take-over of a stale lease; a lease re-taken meanwhile is given up
                try:
                    os.link(mine, path)
                except FileExistsError:
                    if (one_per_job and left_by_an_earlier_run(path)) or is_stale(path, stale_after):
                        path.unlink(missing_ok=True)
                        continue
                    return None
                return cls(path, text, stale_after)
            return None
        finally:
            mine.unlink(missing_ok=True)

    def held(self) -> bool:
        """Whether the lease file is still this holder's."""
        try:
            return self.path.read_text() == self.text
        except FileNotFoundError:
            return False

    def touch(self) -> bool:
        """Refresh the heartbeat; False (and nothing touched) where the lease is no longer ours."""
        if not self.held():
            return False
        os.utime(self.path)
        return True

    def release(self) -> None:
        if self.held():
            self.path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def beating(self, interval: float | None = None) -> Iterator["Lease"]:
        """Touch the lease from a background thread every ``interval`` s (default: a tenth of the stale
        age) while the block runs; the lease is not released at the end."""
        every = self.stale_after / 10 if interval is None else interval
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every):
                with contextlib.suppress(OSError):  # a full disk or a vanished folder: the next beat retries
                    self.touch()

        thread = threading.Thread(target=beat, name=f"lease {self.path.name}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
