"""`histokt train`: one training cell (Stage A source training or Stage B transfer), exactly resumable.

Run directory contract (later stages and users read it):
    config.json    the TrainConfig, written first; a re-run with a different config is refused
    metrics.jsonl  one line per finished epoch (rewritten atomically from the checkpointed history)
    last.pt        {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "batch", "step", ...}: the
                   training state a resume starts from; removed once the cell is done
    previous.pt    the checkpoint before last.pt (a damaged last.pt falls back to it); removed when done
    best.pt        {"model": state_dict, "epoch", "valid_top1"}: the best validation epoch so far
    final.pt       {"model": state_dict, "epoch"}: the weights after the last epoch, written when done
    result.json    written after final.pt, atomically: the cell is done and a re-run is a no-op

All checkpoints load with ``torch.load(..., weights_only=True)``.
"""

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from histokt import __version__, atomic
from histokt.errors import UserError
from histokt.store.augment import Augment, warp_batch
from histokt.store.reader import PatchDataset, make_loader, open_attrs
from histokt.store.sampler import GlobalBatchSampler, eval_shards
from histokt.train import checkpoint, distributed
from histokt.train.config import OPERATIONAL, TrainConfig, config_dict, resolved

# -- configuration ------------------------------------------------------------------------------------------


def check_config(cfg: TrainConfig) -> None:
    for name in ("epochs", "batch_size", "nproc", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UserError(f"--lr {cfg.lr}: must be a positive number")
    if cfg.workers < 0:
        raise UserError(f"--workers {cfg.workers}: must be 0 or more")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {cfg.device!r}: choose auto, cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible here")


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
    old = atomic.read_json(run_dir / "config.json")
    if old is None:
        atomic.write_json(run_dir / "config.json", mine)
        return run_dir
    differ = sorted(k for k in set(mine) | set(old) if k not in OPERATIONAL and mine.get(k) != old.get(k))
    if differ:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {mine.get(k)!r}" for k in differ[:4])
        raise UserError(f"{run_dir}: holds a run with another config ({shown}); use a new --out")
    return run_dir


# -- the command ------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict:
    """Run or resume the cell; with --nproc K > 1, spawn K local DDP processes."""
    check_config(cfg)
    cfg = resolved(cfg)
    world = distributed.from_environment()
    if world is None and cfg.nproc > 1:
        return _spawn(cfg)
    return run(cfg, world or distributed.World())


def _spawn(cfg: TrainConfig) -> dict:
    import torch.multiprocessing as mp

    prepare_run_dir(cfg)  # fail fast, before any process starts
    port = distributed.free_port()
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=_rank_main, args=(cfg, r, port, errors)) for r in range(cfg.nproc)]
    with ForwardSignals(procs) as signals:
        for p in procs:
            p.start()
        signals.arm()
        for p in procs:
            while p.is_alive():
                p.join(timeout=1.0)
                signals.send()
    if not errors.empty():
        kind, message = errors.get()
        if kind == "user":
            raise UserError(message)
        if kind == "requeue":
            return message  # rank 0's {"status": "interrupted", "step", "message"}
        raise RuntimeError(message)
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a training process failed (exit codes {[p.exitcode for p in procs]})")
    return json.loads((Path(cfg.out) / "result.json").read_text())


def _rank_main(cfg: TrainConfig, rank: int, port: int, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        out = run(cfg, distributed.World(rank, cfg.nproc, rank))
        if out.get("status") == "interrupted" and rank == 0:
            errors.put(("requeue", out))
    except UserError as exc:
        errors.put(("user", str(exc)))
    except BaseException as exc:
        errors.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))
        raise


def device_for(cfg: TrainConfig, world: distributed.World) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    index = world.local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def run(cfg: TrainConfig, world: distributed.World) -> dict:
    """The training loop of one rank."""
    run_dir = Path(cfg.out)
    if world.main:
        prepare_run_dir(cfg)
    done = atomic.read_json(run_dir / "result.json")
    if done is not None:
        if world.main:
            drop_training_state(run_dir)  # a kill right after result.json left it behind
        return done
    device = device_for(cfg, world)
    distributed.init(world, device)
    try:
        return Cell(cfg, world, device).fit()
    finally:
        distributed.shutdown()


class StopRequested:
    """SIGUSR2/SIGTERM only set a flag; the loop checks it at the next step boundary (docs/cluster.md §4.2)."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self):
        self.flag = False
        self.previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class ForwardSignals:
    """The --nproc parent passes SIGUSR2/SIGTERM on to its ranks, which checkpoint and exit 75 together.

    A scheduler signals the parent only (the sbatch scripts forward to histokt, not to its children), and
    the parent would die of SIGUSR2's default action. The ranks start with the signals ignored (an ignored
    disposition survives exec) until their own handlers are in place, and the parent sends again every
    second while any rank runs: a signal that arrives during start-up is delayed, never lost or fatal."""

    def __init__(self, procs):
        self.procs, self.pending, self.previous = procs, set(), {}

    def __enter__(self):
        for sig in StopRequested.SIGNALS:
            self.previous[sig] = signal.signal(sig, signal.SIG_IGN)  # inherited by the ranks started next
        return self

    def arm(self):
        """After the ranks started: a Python handler would not survive their exec, SIG_IGN does."""
        for sig in StopRequested.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.pending.add(signum)
        self.send()

    def send(self):
        for p in self.procs:
            if p.pid is not None and p.is_alive():
                for sig in self.pending:
                    os.kill(p.pid, sig)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Cell:
    """Everything one rank holds while training a cell."""

    def __init__(self, cfg: TrainConfig, world: distributed.World, device: torch.device):
        from histokt.store.normstats import norm_constants
        from histokt.train.metrics import loss_fn, multilabel_pos_weights
        from histokt.train.models import apply_bn_mode, build_model, freeze_encoder
        from histokt.train.optim import build_optimizer, build_scheduler

        self.cfg, self.world, self.device = cfg, world, device
        self.run_dir = Path(cfg.out)
        attrs = open_attrs(cfg.store, cfg.dataset)
        self.classes, self.multi_label = list(attrs["classes"]), bool(attrs["multi_label"])
        for split in ("train", "valid", "test"):
            if int(attrs["counts"][split]) == 0:
                raise UserError(f"{cfg.store}/{cfg.dataset}: the {split} split is empty; re-standardize with more data")
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        model = build_model(cfg.arch, len(self.classes), cfg.init)
        if cfg.mode == "fine":
            freeze_encoder(model, cfg.bn)
        self.apply_bn_mode = (lambda m: apply_bn_mode(m, cfg.bn)) if cfg.mode == "fine" else (lambda m: None)
        if cfg.sync_bn and world.size > 1:
            model = distributed.convert_sync_batchnorm(model, device)
        cuda = device.type == "cuda"
        self.memory_format = torch.channels_last if (cuda and cfg.channels_last) else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format)
        self.amp = cuda and cfg.precision in ("auto", "bf16")
        self.net = self.model
        if world.size > 1:
            ids = [device.index] if cuda else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            self.net = torch.compile(self.net)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay, cfg.momentum)
        self.scheduler = build_scheduler(cfg.scheduler, self.optimizer, cfg.step_size, cfg.gamma)
        mean, std = norm_constants(cfg.store, cfg.dataset, cfg.norm)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0)
        augment = Augment(seed=cfg.seed, crop=cfg.crop) if cfg.augment else None
        if cfg.augment_on == "device" and cfg.crop:
            raise UserError("--crop needs --augment-on loader (the device warp has no crop)")
        on_device = cfg.augment_on == "device" or (cfg.augment_on == "auto" and cuda and not cfg.crop)
        self.train_set = PatchDataset(cfg.store, cfg.dataset, "train", augment=augment, augment_on_device=on_device)
        weights = multilabel_pos_weights(self.train_set.labels) if self.multi_label else None
        self.loss = loss_fn(self.multi_label, weights).to(device)
        self.eval_loss = loss_fn(self.multi_label, weights)  # on the CPU, where gathered outputs are
        self.sampler = GlobalBatchSampler(len(self.train_set), cfg.batch_size, world.size, world.rank, cfg.seed)
        self.loader = make_loader(self.train_set, batch_sampler=self.sampler, workers=cfg.workers, pin_memory=cuda)
        self.state = {"epoch": 0, "batch": 0, "step": 0, "history": [], "best": None, "seconds": 0.0}
        self._resume()

    # -- state -------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        ckpt, notes = checkpoint.load_latest(self.run_dir)
        for note in notes:
            if self.world.main:
                print(f"histokt train: warning: {note}", file=sys.stderr)
        if ckpt is None:
            return
        if ckpt.get("arch") != self.cfg.arch:
            raise UserError(f"{self.run_dir}: checkpoint is for {ckpt.get('arch')!r}, not {self.cfg.arch!r}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        checkpoint.set_rng_state(ckpt["rng"])
        for key in self.state:
            self.state[key] = ckpt[key]

    def save(self) -> None:
        """All ranks reach this at the same step; rank 0 writes (replicated weights)."""
        distributed.barrier()
        if self.world.main:
            self.state["seconds"] += time.time() - self.t0
            self.t0 = time.time()
            checkpoint.save(
                self.run_dir,
                {
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": None,  # bf16 autocast needs no loss scaling
                    "rng": checkpoint.rng_state(),
                    "arch": self.cfg.arch,
                    "world_size": self.world.size,
                    "histokt_version": __version__,
                    **self.state,
                },
            )
        distributed.barrier()

    # -- loop --------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        self.t0 = self.last_save = time.time()
        with StopRequested() as stop:
            while self.state["epoch"] < self.cfg.epochs:
                epoch = self.state["epoch"]
                if self.train_epoch(epoch, stop):
                    return {
                        "status": "interrupted",
                        "step": self.state["step"],
                        "message": f"checkpointed at step {self.state['step']} on a signal; run the same "
                        "command again to resume",
                    }
                self.end_epoch(epoch)
                self.last_save = time.time()
        return self.finish()

    def train_epoch(self, epoch: int, stop: StopRequested) -> bool:
        """The steps of one epoch from the checkpointed batch on; True if a signal stopped it."""
        self.sampler.set_epoch(epoch, self.state["batch"])
        self.net.train()
        self.apply_bn_mode(self.model)
        bar = tqdm(
            self.loader,
            desc=f"epoch {epoch}",
            unit="batch",
            leave=False,
            file=sys.stderr,
            disable=None if self.cfg.progress and self.world.main else True,
        )
        for batch in bar:
            loss = self.step(*batch)
            self.state["step"] += 1
            self.state["batch"] += 1
            every = self.cfg.ckpt_every_steps and self.state["step"] % self.cfg.ckpt_every_steps == 0
            timed = self.cfg.ckpt_every_min and time.time() - self.last_save > 60 * self.cfg.ckpt_every_min
            # one collective a step: every rank stops, fails or saves at the same step
            halt, bad, periodic = distributed.any_rank(
                [stop.flag, not math.isfinite(loss), bool(every or timed)], self.device
            )
            if bad:
                raise UserError(
                    f"loss is not finite at epoch {epoch} step {self.state['step']}; the last good checkpoint "
                    f"({self.run_dir / checkpoint.LAST}) is kept; lower --lr and run again with a new --out"
                )
            if halt or periodic:
                self.save()
                self.last_save = time.time()
            if halt:
                return True
        return False

    def to_device(self, images: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 NHWC-strided batch -> normalized float on the device (4x fewer bytes cross the bus); with the
        augmentation draws, the raw pixels are warped there first (zero fill = black)."""
        x = images.to(self.device, non_blocking=True)
        if params is not None:
            x = warp_batch(x.float(), params)
        x = x.to(memory_format=self.memory_format)
        return (x.float() - self.mean) * self.inv_std

    def step(self, images: torch.Tensor, labels: torch.Tensor, params: torch.Tensor | None = None) -> float:
        x = self.to_device(images, params)
        y = labels.to(self.device, non_blocking=True)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()
        with autocast:
            loss = self.loss(self.net(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, split: str, model: torch.nn.Module) -> dict:
        """Metrics of ``model`` on a whole split; every rank evaluates a shard, rank 0's BN stats."""
        from histokt.train.metrics import multi_label, single_label

        distributed.broadcast_buffers(model)
        model.eval()
        data = PatchDataset(self.cfg.store, self.cfg.dataset, split)
        outs, ys = [], []
        for batch in eval_shards(len(data), self.cfg.eval_batch_size, self.world.size, self.world.rank):
            images, labels = data.__getitems__(batch)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()
            with autocast:
                outs.append(model(self.to_device(images)).float().cpu())
            ys.append(labels)
        logits = distributed.gather_cat(torch.cat(outs) if outs else torch.empty(0, len(self.classes)))
        targets = distributed.gather_cat(torch.cat(ys) if ys else torch.empty(0, dtype=torch.int64))
        metrics = multi_label(logits, targets) if self.multi_label else single_label(logits, targets, len(self.classes))
        metrics["loss"] = float(self.eval_loss(logits, targets))
        return metrics

    def end_epoch(self, epoch: int) -> None:
        self.scheduler.step()
        valid = self.evaluate("valid", self.model)
        line = {"epoch": epoch, "step": self.state["step"], "lr": self.optimizer.param_groups[0]["lr"], "valid": valid}
        best = self.state["best"]
        if best is None or valid["top1"] > best["top1"]:  # strictly improving, as HistoKT
            self.state["best"] = {"top1": valid["top1"], "epoch": epoch}
            if self.world.main:
                checkpoint.save_weights(
                    self.run_dir / "best.pt",
                    {
                        "model": self.model.state_dict(),
                        "epoch": epoch,
                        "valid_top1": valid["top1"],
                        "arch": self.cfg.arch,
                        "classes": self.classes,
                    },
                )
        self.state["history"].append(line)
        if self.world.main:
            text = "".join(json.dumps(h, sort_keys=True) + "\n" for h in self.state["history"])
            atomic.write_bytes(self.run_dir / "metrics.jsonl", text.encode())
            print(f"epoch {epoch}: valid top1 {valid['top1']:.4f} loss {valid['loss']:.4f}", file=sys.stderr)
        self.state["epoch"], self.state["batch"] = epoch + 1, 0
        self.save()

    def finish(self) -> dict:
        # the last epoch's weights, before best.pt's replace them (only rank 0 writes final.pt)
        final = {k: v.detach().clone() for k, v in self.model.state_dict().items()} if self.world.main else None
        best = checkpoint.load(self.run_dir / "best.pt") if self.world.main else None
        box = [best["model"] if best else None]
        if distributed.active():
            torch.distributed.broadcast_object_list(box, src=0)
        self.model.load_state_dict(box[0])
        test = self.evaluate("test", self.model)
        seconds = self.state["seconds"] + time.time() - self.t0
        result = {
            "config": config_dict(self.cfg),
            "classes": self.classes,
            "valid": {"top1_best": self.state["best"]["top1"], "best_epoch": self.state["best"]["epoch"]},
            "test": test,
            "epochs": self.state["epoch"],
            "steps": self.state["step"],
            "world_size": self.world.size,
            "seconds": seconds,
            "histokt_version": __version__,
        }
        if self.world.main:
            checkpoint.save_weights(self.run_dir / "final.pt", {"model": final, "epoch": self.state["epoch"] - 1})
            atomic.write_json(self.run_dir / "result.json", result)
            drop_training_state(self.run_dir)
        distributed.barrier()
        return result


def drop_training_state(run_dir: Path) -> None:
    """A finished cell never resumes: its optimizer state and fallback are only disk (135-270 MB a ResNet18
    cell); final.pt keeps the last weights. Cells finished before final.pt existed keep their last.pt."""
    if (run_dir / "final.pt").is_file():
        for name in (checkpoint.LAST, checkpoint.PREVIOUS):
            (run_dir / name).unlink(missing_ok=True)


__all__ = ["TrainConfig", "train"]
