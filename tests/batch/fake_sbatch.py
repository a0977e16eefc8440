"""submitit's real SlurmExecutor with only the `sbatch` call faked, so a test sees what a sweep would submit.

Every submission goes through submitit's own code (parameters, arrays, the sbatch file it writes); only
`_make_submission_command` is replaced: instead of `sbatch FILE` it runs `echo "Submitted batch job N"` after
keeping FILE's text. Nothing reaches a cluster, and no SLURM tools are needed (`srun` is not looked up).
"""

import itertools
from dataclasses import dataclass, field


@dataclass
class FakeSbatch:
    scripts: list = field(default_factory=list)  # (job id, sbatch file text), in submission order
    ids: itertools.count = field(default_factory=lambda: itertools.count(4242))


def install(monkeypatch, max_array_size: int = 1001) -> FakeSbatch:
    import submitit

    from histokt.batch import slurm

    fake = FakeSbatch()

    def submission_command(self, path):
        job = str(next(fake.ids))
        fake.scripts.append((job, path.read_text()))
        return ["echo", f"Submitted batch job {job}"]

    monkeypatch.setattr(submitit.SlurmExecutor, "_make_submission_command", submission_command)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    monkeypatch.setattr(slurm, "max_array_size", lambda: max_array_size)
    return fake
