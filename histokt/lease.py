"""Leases: "this piece of work is mine" as one small file, safe on a shared cluster filesystem.

The contract (any user: a standardize part, the finalize step, later a training cell per job):

- A lease is a file, e.g. ``parts/p000003.lease``. It appears whole: the taker writes a temporary file
  beside it that already holds its owner, then hard-links it to the lease's name. ``os.link`` fails when
  the name exists, so exactly one taker wins, and nobody ever reads a half-written (empty) lease.
- Its text is one line ``HOST PID STARTED [JOB]``: the host name, the process id, the time it was taken
  (informative only) and, inside SLURM, the job (``SLURM_ARRAY_JOB_ID``_``SLURM_ARRAY_TASK_ID``, or
  ``SLURM_JOB_ID``); ``holder(path)`` renders it for messages: "host h, pid p, job j, 12 s ago".
- The heartbeat is the file's mtime: the holder refreshes it with ``Lease.touch()`` (or a background
  ``with lease.beating():``) more often than the stale age, and the age in messages is measured from it.
- Staleness, decided by the next taker: a lease of this host whose process is dead is stale at once,
  however young; a lease of this host whose process lives is never stale, however old (its holder may
  be slow, not dead); a lease of another host (whose processes cannot be checked) is stale when its
  heartbeat is older than ``stale_after`` seconds; an unreadable lease (which this module never writes)
  is stale. A stale lease is removed and taken: its holder's unfinished work is the taker's to redo.
- ``release()`` removes the lease only while it is still this holder's (a lease taken over after this
  process stalled is left to its new holder); ``touch()`` says whether it still is.

Known limits: two takers judging the same stale lease at the same instant may both win (the window is
between reading it and linking); a pid reused by an unrelated process of the same host keeps a dead
holder's lease alive until that process ends. Neither can corrupt work that is verified on completion.
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
    """This process's SLURM job: ``ARRAYJOB_TASK`` for an array task, the job id otherwise, else None."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


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
    """Whether process ``pid`` of this host exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def is_stale(path, stale_after: float = DEFAULT_STALE_S) -> bool:
    """Whether the lease at ``path`` may be taken over (the rules are in the module docstring)."""
    h = read(path)
    if h is None:
        return True
    if h.host == socket.gethostname():
        return not alive(h.pid)
    return time.time() - h.heartbeat > stale_after


class Lease:
    """A lease this process holds; get one with ``Lease.acquire``."""

    def __init__(self, path: Path, text: str, stale_after: float):
        self.path = path
        self.text = text
        self.stale_after = stale_after

    @classmethod
    def acquire(cls, path, *, stale_after: float = DEFAULT_STALE_S) -> "Lease | None":
        """Take the lease at ``path``, or None where a live holder has it. A stale lease is taken over.
        The folder must exist (FileNotFoundError otherwise: the work it guarded may be gone)."""
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
                    if is_stale(path, stale_after):
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
