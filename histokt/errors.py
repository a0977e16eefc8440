"""The one exception type that means "the user gave us something wrong", and the exit codes every command shares."""

# EX_TEMPFAIL: checkpointed on a signal; run the same command again to resume. The sbatch scripts in slurm/
# requeue on it (they hold their own copy, which tests/test_slurm_scripts.py checks against this one).
EXIT_REQUEUE = 75


class UserError(Exception):
    """Bad input: the CLI prints ``histokt: <message>`` on one line and exits with code 2."""

    exit_code = 2


def verify_download(dataset: str, path, expectation: str) -> UserError:
    """A card's layout check failed: name the dataset, the path and what was expected."""
    return UserError(f"{dataset}: {path}: {expectation}; verify the download")
