"""What one call of ``histokt.train.launch.train`` ends with: a finished cell, or a checkpoint-and-stop on a signal."""

from dataclasses import dataclass

from histokt.result import CellResult


@dataclass(frozen=True)
class Outcome:
    """``result`` is the cell's result.json when it finished; None when a signal stopped it at ``step`` (its
    checkpoint is written: run the same command again to resume, exit code 75 = EXIT_REQUEUE)."""

    step: int
    message: str
    result: CellResult | None

    @property
    def interrupted(self) -> bool:
        return self.result is None

    @classmethod
    def finished(cls, result: CellResult) -> "Outcome":
        return cls(result.steps, "done", result)

    @classmethod
    def stopped(cls, step: int) -> "Outcome":
        return cls(step, f"checkpointed at step {step} on a signal; run the same command again to resume", None)
