"""result.json, the record a finished training cell leaves: its schema, defined once.

``histokt train`` builds a :class:`CellResult` and writes ``to_json()``; ``histokt collect`` reads every cell's
file with :meth:`CellResult.read` (or ``from_json``). The module imports neither torch nor the trainer, so the
collector stays light and never depends on ``histokt.train``.

The file (keys sorted, as ``histokt.atomic.write_json`` writes them)::

    config           the cell's TrainConfig as config.json holds it (paths as strings)
    classes          the class names, in label order
    valid            {"top1_best": best validation top-1 (fraction), "best_epoch": its epoch}
    test             the test metrics of the best-validation weights: top1, balanced_acc, per_class_acc, n, loss
    epochs, steps    epochs and optimizer steps trained
    world_size       processes that trained the cell
    seconds          training wall time (all attempts, resumes included)
    histokt_version  the histokt that wrote it
    runtime          where it ran (histokt.provenance): python, torch, histokt, container {image, sif_id} or
                     null; {} in files written before it was recorded
    settings         how it computed, fixed at the cell's first start (histokt.train.precision): precision
                     (bf16, fp16 or fp32), compile, warp (device or loader); {} in files written before
    protocol         the cell's protocol (histokt.protocol): "histokt" or "paper"; "" in files written before
    deviations       every way the cell differs from the paper (histokt.protocol.Deviation: what, ours,
                     paper, fixed), its options and its dataset's; null in files written before it was recorded
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE = "result.json"
KEYS = ("config", "classes", "valid", "test", "epochs", "steps", "world_size", "seconds", "histokt_version")


class MalformedResult(ValueError):
    """A result.json that parses as JSON but does not hold a cell's result; the message says what is wrong."""


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _deviations(value: object) -> list[dict[str, Any]] | None:
    """The recorded deviations, or None where a file has none (or none this histokt can read)."""
    if not isinstance(value, list) or not all(
        isinstance(d, dict) and {"what", "ours", "paper"} <= set(d) for d in value
    ):
        return None
    return value


@dataclass(frozen=True)
class BestValid:
    """The best validation epoch: its top-1 (a fraction) and its index."""

    top1_best: float
    best_epoch: int


@dataclass(frozen=True)
class CellResult:
    """One finished training cell: exactly the keys of result.json."""

    config: dict[str, Any]
    classes: list[str]
    valid: BestValid
    test: dict[str, Any]
    epochs: int
    steps: int
    world_size: int
    seconds: float
    histokt_version: str
    runtime: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    protocol: str = ""
    deviations: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of result.json (new containers, the values as given)."""
        return {
            "config": dict(self.config),
            "classes": list(self.classes),
            "valid": {"top1_best": self.valid.top1_best, "best_epoch": self.valid.best_epoch},
            "test": dict(self.test),
            "epochs": self.epochs,
            "steps": self.steps,
            "world_size": self.world_size,
            "seconds": self.seconds,
            "histokt_version": self.histokt_version,
            "runtime": dict(self.runtime),
            "settings": dict(self.settings),
            "protocol": self.protocol,
            "deviations": None if self.deviations is None else [dict(d) for d in self.deviations],
        }

    @classmethod
    def from_json(cls, doc: object) -> "CellResult":
        """Parse a decoded result.json; raises MalformedResult naming what is absent or of the wrong type.

        Unknown keys are ignored (a newer histokt may add some)."""
        if not isinstance(doc, dict):
            raise MalformedResult(f"not a JSON object but {type(doc).__name__}")
        missing = [k for k in KEYS if k not in doc]
        if missing:
            raise MalformedResult(f"no {', '.join(missing)}")
        valid, test = doc["valid"], doc["test"]
        checks = [
            ("config", isinstance(doc["config"], dict), "an object"),
            (
                "classes",
                isinstance(doc["classes"], list) and all(isinstance(c, str) for c in doc["classes"]),
                "a list of names",
            ),
            ("valid", isinstance(valid, dict), "an object"),
            ("valid.top1_best", not isinstance(valid, dict) or _is_number(valid.get("top1_best")), "a number"),
            ("valid.best_epoch", not isinstance(valid, dict) or _is_int(valid.get("best_epoch")), "an integer"),
            ("test", isinstance(test, dict), "an object"),
            ("test.top1", not isinstance(test, dict) or _is_number(test.get("top1")), "a number"),
            ("epochs", _is_int(doc["epochs"]), "an integer"),
            ("steps", _is_int(doc["steps"]), "an integer"),
            ("world_size", _is_int(doc["world_size"]), "an integer"),
            ("seconds", _is_number(doc["seconds"]), "a number"),
            ("histokt_version", isinstance(doc["histokt_version"], str), "a string"),
        ]
        wrong = [f"{name} is not {what}" for name, ok, what in checks if not ok]  # a field inside a non-object: once
        if wrong:
            raise MalformedResult("; ".join(wrong))
        return cls(
            config=doc["config"],
            classes=doc["classes"],
            valid=BestValid(valid["top1_best"], valid["best_epoch"]),
            test=test,
            epochs=doc["epochs"],
            steps=doc["steps"],
            world_size=doc["world_size"],
            seconds=doc["seconds"],
            histokt_version=doc["histokt_version"],
            runtime=runtime if isinstance(runtime := doc.get("runtime"), dict) else {},
            settings=settings if isinstance(settings := doc.get("settings"), dict) else {},
            protocol=protocol if isinstance(protocol := doc.get("protocol"), str) else "",
            deviations=_deviations(doc.get("deviations")),
        )

    @classmethod
    def read(cls, path: Path | str) -> "CellResult":
        """Read and parse a result.json. Raises FileNotFoundError when it is absent, OSError when unreadable,
        ValueError (json.JSONDecodeError, UnicodeDecodeError) when it is not JSON, MalformedResult when it is
        JSON but not a result."""
        return cls.from_json(json.loads(Path(path).read_bytes()))
