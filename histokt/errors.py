"""The one exception type that means "the user gave us something wrong", and the exit codes every command shares."""

import contextlib
import errno
from collections.abc import Iterator

# EX_TEMPFAIL: checkpointed on a signal; run the same command again to resume. The sbatch scripts in slurm/
# requeue on it (they hold their own copy, which tests/test_slurm_scripts.py checks against this one).
EXIT_REQUEUE = 75
# Nothing to do here for now: every piece of work left is held by other live processes (their leases name
# them), e.g. the same `histokt standardize` started twice. Not a failure of theirs; run again once they end.
EXIT_BUSY = 3
# an input cell failed or is not done: this cell cannot run (not a failure of its own)
EXIT_BLOCKED = 4

FULL_DISK = {
    errno.ENOSPC: "no space left on the device (ENOSPC)",
    errno.EDQUOT: "disk quota exceeded (EDQUOT)",
}


class UserError(Exception):
    """Bad input: the CLI prints ``histokt: <message>`` on one line and exits with code 2."""

    exit_code = 2


def verify_download(dataset: str, path, expectation: str) -> UserError:
    """A card's layout check failed: name the dataset, the path and what was expected."""
    return UserError(f"{dataset}: {path}: {expectation}; verify the download")


def full_disk(exc: BaseException, path=None) -> UserError | None:
    """The user's message for an OSError of a full disk or an exceeded quota, naming the file (the error's
    own, else ``path``); None for any other error. Whatever wrote must resume when run again."""
    if not isinstance(exc, OSError) or exc.errno not in FULL_DISK:
        return None
    where = exc.filename if exc.filename is not None else (path if path is not None else "the output folder")
    return UserError(
        f"{where}: {FULL_DISK[exc.errno]}; free space or raise the quota, then run the same command again: it resumes"
    )


@contextlib.contextmanager
def on_full_disk(path=None) -> Iterator[None]:
    """Turn a full disk or an exceeded quota inside the block into that one-line UserError (``path`` is named
    where the OSError names no file, as a failed ``write`` does); other errors pass unchanged."""
    try:
        yield
    except OSError as exc:
        error = full_disk(exc, path)
        if error is None:
            raise
        raise error from None
