"""The run directory of one training cell: what it holds, and the steps that create, check and tidy it.

Run directory contract (later stages and users read it):
    config.json    the TrainConfig, written first; a re-run with a different config is refused
    metrics.jsonl  one line per finished epoch (rewritten atomically from the checkpointed history)
    last.pt        {"model", "optimizer", "scheduler", "scaler", "rng", "settings", "epoch", "batch", "step",
                   ...}: the training state a resume starts from (settings: the precision, compile flag and
                   warp place fixed at the first start), written every --ckpt-every-min minutes of wall time
                   (and every --ckpt-every-steps steps where set) and on a stop signal, never at an epoch's
                   end; removed once the cell is done
    previous.pt    the checkpoint before last.pt (a damaged last.pt falls back to it); removed when done
    best.pt        {"model": state_dict, "epoch", "valid_top1"}: the best validation epoch so far; once the
                   cell is done, kept where --keep names it (the default; transfers and merges read it)
    final.pt       {"model": state_dict, "epoch"}: the weights after the last epoch, written when done where
                   --keep names it (the default)
    result.json    written after final.pt, atomically: the cell is done and a re-run is a no-op
                   (its schema: histokt.result.CellResult)

All checkpoints load with ``torch.load(..., weights_only=True)``. A resume from last.pt replays the steps
and epoch ends since it (validation, best.pt, metrics.jsonl) bit for bit. A file that cannot be written for
a full disk or quota ends the cell with one line naming it (histokt.errors.full_disk); what was written
before stays, and the same command resumes once space is freed.
"""

from pathlib import Path

from histokt import atomic, result
from histokt.errors import UserError, full_disk
from histokt.result import CellResult
from histokt.train import checkpoint
from histokt.train.config import ADDED, OPERATIONAL, TrainConfig, config_dict, kept_weights

CONFIG = "config.json"
METRICS = "metrics.jsonl"
LAST, PREVIOUS = checkpoint.LAST, checkpoint.PREVIOUS
BEST = "best.pt"
FINAL = "final.pt"
RESULT = result.FILE


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create RUN_DIR and write config.json, or check that an existing one matches."""
    kept_weights(cfg.keep)  # a bad --keep fails here, before anything is written
    run_dir = Path(cfg.out)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        full = full_disk(OSError(exc.errno, exc.strerror), run_dir)
        if full is not None:
            raise full from None
        raise UserError(f"--out {run_dir}: cannot write there ({exc.strerror}); choose a writable folder") from None
    mine = config_dict(cfg)
    old = atomic.read_json(run_dir / CONFIG)
    if old is None:
        with checkpoint.full_disk_names(run_dir / CONFIG):
            atomic.write_json(run_dir / CONFIG, mine)
        return run_dir
    old = {**ADDED, **old}
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
    with checkpoint.full_disk_names(run_dir / RESULT):
        atomic.write_json(run_dir / RESULT, done.to_json())


def drop_training_state(run_dir: Path, keep: str | None = None) -> None:
    """A finished cell never resumes: its optimizer state and fallback are only disk (135-270 MB a ResNet18
    cell), and of best.pt and final.pt it keeps what ``keep`` names (--keep; None: what result.json records).
    Call it once result.json is written. Cells finished before --keep existed record none: they drop the
    training state only where final.pt holds the last weights (before final.pt existed, last.pt did)."""
    if keep is None:
        keep = _recorded_keep(run_dir)
        if keep is None:
            if (run_dir / FINAL).is_file():
                for name in (LAST, PREVIOUS):
                    (run_dir / name).unlink(missing_ok=True)
            return
    kept = kept_weights(keep)
    for name in (LAST, PREVIOUS):
        (run_dir / name).unlink(missing_ok=True)
    for word, name in (("best", BEST), ("final", FINAL)):
        if word not in kept:
            (run_dir / name).unlink(missing_ok=True)


def _recorded_keep(run_dir: Path) -> str | None:
    """The --keep of the run that wrote result.json, or None (no result, or one from before --keep)."""
    try:
        done = atomic.read_json(run_dir / RESULT)
    except ValueError:
        return None
    config = done.get("config") if isinstance(done, dict) else None
    keep = config.get("keep") if isinstance(config, dict) else None
    return keep if isinstance(keep, str) else None
