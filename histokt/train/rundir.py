"""The run directory of one training cell: what it holds, and the steps that create, check and tidy it.

Run directory contract (later stages and users read it):
    config.json    the TrainConfig, written first; a re-run with a different config is refused
    metrics.jsonl  one line per finished epoch (rewritten atomically from the checkpointed history)
    last.pt        {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "batch", "step", ...}: the
                   training state a resume starts from; removed once the cell is done
    previous.pt    the checkpoint before last.pt (a damaged last.pt falls back to it); removed when done
    best.pt        {"model": state_dict, "epoch", "valid_top1"}: the best validation epoch so far
    final.pt       {"model": state_dict, "epoch"}: the weights after the last epoch, written when done
    result.json    written after final.pt, atomically: the cell is done and a re-run is a no-op
                   (its schema: histokt.result.CellResult)

All checkpoints load with ``torch.load(..., weights_only=True)``.
"""

from pathlib import Path

from histokt import atomic, result
from histokt.errors import UserError
from histokt.result import CellResult
from histokt.train import checkpoint
from histokt.train.config import OPERATIONAL, TrainConfig, config_dict

CONFIG = "config.json"
METRICS = "metrics.jsonl"
LAST, PREVIOUS = checkpoint.LAST, checkpoint.PREVIOUS
BEST = "best.pt"
FINAL = "final.pt"
RESULT = result.FILE


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create RUN_DIR and write config.json, or check that an existing one matches."""
    run_dir = Path(cfg.out)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"--out {run_dir}: cannot write there ({exc.strerror}); choose a writable folder") from None
    mine = config_dict(cfg)
    old = atomic.read_json(run_dir / CONFIG)
    if old is None:
        atomic.write_json(run_dir / CONFIG, mine)
        return run_dir
    differ = sorted(k for k in set(mine) | set(old) if k not in OPERATIONAL and mine.get(k) != old.get(k))
    if differ:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {mine.get(k)!r}" for k in differ[:4])
        raise UserError(f"{run_dir}: holds a run with another config ({shown}); use a new --out")
    return run_dir


def read_result(run_dir: Path) -> CellResult | None:
    """The cell's result.json, or None while it is not done; a damaged one is a UserError."""
    try:
        return CellResult.read(run_dir / RESULT)
    except FileNotFoundError:
        return None
    except ValueError as exc:  # not JSON, or JSON that is no result (MalformedResult)
        raise UserError(
            f"{run_dir / RESULT}: not a valid result ({type(exc).__name__}: {exc}); move it away to train again"
        ) from None


def write_result(run_dir: Path, done: CellResult) -> None:
    atomic.write_json(run_dir / RESULT, done.to_json())


def drop_training_state(run_dir: Path) -> None:
    """A finished cell never resumes: its optimizer state and fallback are only disk (135-270 MB a ResNet18
    cell); final.pt keeps the last weights. Cells finished before final.pt existed keep their last.pt."""
    if (run_dir / FINAL).is_file():
        for name in (LAST, PREVIOUS):
            (run_dir / name).unlink(missing_ok=True)
