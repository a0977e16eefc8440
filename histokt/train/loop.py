"""The Trainer: everything one rank holds while it trains a cell, and the loop that runs its epochs.

Built in named steps (dataset, seeds, model, optimizer, normalization, data), then resumed from the run
directory's newest checkpoint; ``fit`` trains to the last epoch and writes best.pt, final.pt and result.json
(the run directory: histokt.train.rundir; started by histokt.train.launch).

Checkpoint policy: the training state (last.pt, with the optimizer's) is written every ``ckpt_every_min``
minutes of wall time (default 10), every ``ckpt_every_steps`` steps where set, and on a stop signal; never
at an epoch's end, so a cell of short epochs writes none at all. A resume replays what followed its
checkpoint, epoch ends included (validation, best.pt, metrics.jsonl), bit for bit. A done cell drops the
training state and keeps the weights ``keep`` names. A file that cannot be written for a full disk or quota
stops every rank with one line naming it; the files written before stay, and the same command resumes.
"""

import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from tqdm import tqdm

from histokt import __version__, atomic, provenance
from histokt.errors import UserError
from histokt.result import BestValid, CellResult
from histokt.store.augment import Augment, warp_batch
from histokt.store.reader import PatchDataset, make_loader
from histokt.store.sampler import GlobalBatchSampler, eval_shards
from histokt.store.schema import open_attrs
from histokt.train import checkpoint, distributed, rundir
from histokt.train.config import TrainConfig, config_dict, kept_weights
from histokt.train.outcome import Outcome
from histokt.train.signals import StopRequested


class Best(TypedDict):
    """The best validation epoch so far."""

    top1: float
    epoch: int


class TrainState(TypedDict):
    """Where training stands; checkpointed with the weights, so a resume continues at the same step."""

    epoch: int  # the epoch under way (== epochs when done)
    batch: int  # batches of that epoch already trained
    step: int  # optimizer steps in all
    history: list[dict[str, Any]]  # one metrics.jsonl line per finished epoch
    best: Best | None
    seconds: float  # training wall time of earlier attempts and saves


def fresh_state() -> TrainState:
    return {"epoch": 0, "batch": 0, "step": 0, "history": [], "best": None, "seconds": 0.0}


def state_of(ckpt: dict[str, Any]) -> TrainState:
    """The TrainState a checkpoint holds."""
    return {
        "epoch": ckpt["epoch"],
        "batch": ckpt["batch"],
        "step": ckpt["step"],
        "history": ckpt["history"],
        "best": ckpt["best"],
        "seconds": ckpt["seconds"],
    }


def is_new_best(valid_top1: float, best: Best | None) -> bool:
    """Strictly improving, as HistoKT: an epoch that only equals the best so far keeps the earlier best.pt."""
    return best is None or valid_top1 > best["top1"]


def _recipe(cfg: TrainConfig) -> tuple[str, float, int]:
    """optimizer, lr and step_size, which histokt.train.config.resolved has filled."""
    if cfg.optimizer is None or cfg.lr is None or cfg.step_size is None:
        raise ValueError("the TrainConfig is not resolved (histokt.train.config.resolved fills the recipe)")
    return cfg.optimizer, cfg.lr, cfg.step_size


class Trainer:
    """Everything one rank holds while training a cell."""

    def __init__(self, cfg: TrainConfig, world: distributed.World, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        self.run_dir = Path(cfg.out)
        self.cuda = device.type == "cuda"
        self.t0 = self.last_save = time.time()  # fit() restarts both clocks
        self._read_dataset()
        self._seed()
        self._build_model()
        self._build_optimizer()
        self._build_normalization()
        self._build_data()
        self.state = fresh_state()
        self._resume()

    # -- building, in this order (the seeded draws of model init and data order depend on it) -------------
    def _read_dataset(self) -> None:
        """Class names and kind of the target; every split must hold patches."""
        cfg = self.cfg
        attrs = open_attrs(cfg.store, cfg.dataset)
        self.classes, self.multi_label = list(attrs["classes"]), bool(attrs["multi_label"])
        for split in ("train", "valid", "test"):
            if int(attrs["counts"][split]) == 0:
                raise UserError(f"{cfg.store}/{cfg.dataset}: the {split} split is empty; re-standardize with more data")

    def _seed(self) -> None:
        torch.manual_seed(self.cfg.seed)
        np.random.seed(self.cfg.seed % 2**32)

    def _build_model(self) -> None:
        """The model (frozen encoder in fine mode, synchronized BN if asked), on the device, wrapped for DDP."""
        from histokt.train.models import apply_bn_mode, build_model, freeze_encoder

        cfg, world, device = self.cfg, self.world, self.device
        model = build_model(cfg.arch, len(self.classes), cfg.init)
        if cfg.mode == "fine":
            freeze_encoder(model, cfg.bn)
        self.apply_bn_mode: Callable[[torch.nn.Module], object] = (
            (lambda m: apply_bn_mode(m, cfg.bn)) if cfg.mode == "fine" else (lambda m: None)
        )
        if cfg.sync_bn and world.size > 1:
            model = distributed.convert_sync_batchnorm(model, device)
        fmt = torch.channels_last if (self.cuda and cfg.channels_last) else torch.contiguous_format
        self.memory_format = fmt
        # torch's stub lacks the to(device, memory_format=...) overload that Module.to accepts at run time
        self.model: torch.nn.Module = model.to(device, memory_format=fmt)  # type: ignore[call-overload]
        self.amp = self.cuda and cfg.precision in ("auto", "bf16")
        net: torch.nn.Module = self.model
        if world.size > 1:
            ids = [device.index] if self.cuda else None
            net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            net = torch.compile(net)  # type: ignore[assignment]  # torch's stub types it as a callable
        self.net = net

    def _build_optimizer(self) -> None:
        from histokt.train.optim import build_optimizer, build_scheduler

        cfg = self.cfg
        name, lr, step_size = _recipe(cfg)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(name, params, lr, cfg.weight_decay, cfg.momentum)
        self.scheduler = build_scheduler(cfg.scheduler, self.optimizer, step_size, cfg.gamma)

    def _build_normalization(self) -> None:
        """Per-channel mean and 1/std of the chosen statistics, for uint8 pixels, on the device."""
        from histokt.store.normstats import norm_constants

        mean, std = norm_constants(self.cfg.store, self.cfg.dataset, self.cfg.norm)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255.0)

    def _build_data(self) -> None:
        """The training set (augmented in the loader or on the device), its loss, sampler and loader."""
        from histokt.train.metrics import loss_fn, multilabel_pos_weights

        cfg, world = self.cfg, self.world
        augment = Augment(seed=cfg.seed, crop=cfg.crop) if cfg.augment else None
        if cfg.augment_on == "device" and cfg.crop:
            raise UserError("--crop needs --augment-on loader (the device warp has no crop)")
        on_device = cfg.augment_on == "device" or (cfg.augment_on == "auto" and self.cuda and not cfg.crop)
        self.train_set = PatchDataset(cfg.store, cfg.dataset, "train", augment=augment, augment_on_device=on_device)
        weights = multilabel_pos_weights(self.train_set.labels) if self.multi_label else None
        self.loss = loss_fn(self.multi_label, weights).to(self.device)
        self.eval_loss = loss_fn(self.multi_label, weights)  # on the CPU, where gathered outputs are
        self.sampler = GlobalBatchSampler(len(self.train_set), cfg.batch_size, world.size, world.rank, cfg.seed)
        self.loader = make_loader(self.train_set, batch_sampler=self.sampler, workers=cfg.workers, pin_memory=self.cuda)

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
        self.state = state_of(ckpt)

    def save(self) -> None:
        """All ranks reach this at the same step; rank 0 writes (replicated weights)."""
        distributed.barrier()
        if self.world.main:
            self.state["seconds"] += time.time() - self.t0
            self.t0 = time.time()
        self.on_main(
            lambda: checkpoint.save(
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
        )

    def on_main(self, write: Callable[[], object]) -> None:
        """Rank 0 runs ``write`` while the others wait. Should it fail, every rank stops: a UserError (a full
        disk: one line naming the file) with the same message on each, any other error as a RuntimeError
        naming rank 0's (which raises its own), never a rank left waiting for a collective."""
        failed: BaseException | None = None
        error: tuple[bool, str] | None = None
        if self.world.main:
            try:
                write()
            except Exception as exc:
                failed = exc
                user = isinstance(exc, UserError)
                error = (user, str(exc) if user else f"rank 0 failed to write: {type(exc).__name__}: {exc}")
        box = [error]
        if distributed.active():
            torch.distributed.broadcast_object_list(box, src=0)
        if failed is not None:
            raise failed
        if box[0] is not None:
            user, message = box[0]
            raise UserError(message) if user else RuntimeError(message)

    # -- loop --------------------------------------------------------------------------------------------
    def fit(self) -> Outcome:
        self.t0 = self.last_save = time.time()
        with StopRequested() as stop:
            while self.state["epoch"] < self.cfg.epochs:
                epoch = self.state["epoch"]
                if self.train_epoch(epoch, stop):
                    return Outcome.stopped(self.state["step"])
                self.end_epoch(epoch)  # no checkpoint here: a resume replays the epoch end
        return Outcome.finished(self.finish())

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

    def _autocast(self) -> AbstractContextManager[object]:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()

    def step(self, images: torch.Tensor, labels: torch.Tensor, params: torch.Tensor | None = None) -> float:
        x = self.to_device(images, params)
        y = labels.to(self.device, non_blocking=True)
        with self._autocast():
            loss = self.loss(self.net(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, split: str, model: torch.nn.Module) -> dict[str, Any]:
        """Metrics of ``model`` on a whole split; every rank evaluates a shard, rank 0's BN stats."""
        from histokt.train.metrics import multi_label, single_label

        distributed.broadcast_buffers(model)
        model.eval()
        data = PatchDataset(self.cfg.store, self.cfg.dataset, split)
        outs, ys = [], []
        for batch in eval_shards(len(data), self.cfg.eval_batch_size, self.world.size, self.world.rank):
            images, labels = data.__getitems__(batch)
            with self._autocast():
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
        new_best = is_new_best(valid["top1"], self.state["best"])
        if new_best:
            self.state["best"] = {"top1": valid["top1"], "epoch": epoch}
        self.state["history"].append(line)

        def write() -> None:
            if new_best:
                checkpoint.save_weights(
                    self.run_dir / rundir.BEST,
                    {
                        "model": self.model.state_dict(),
                        "epoch": epoch,
                        "valid_top1": valid["top1"],
                        "arch": self.cfg.arch,
                        "classes": self.classes,
                    },
                )
            text = "".join(json.dumps(h, sort_keys=True) + "\n" for h in self.state["history"])
            with checkpoint.full_disk_names(self.run_dir / rundir.METRICS):
                atomic.write_bytes(self.run_dir / rundir.METRICS, text.encode())
            print(f"epoch {epoch}: valid top1 {valid['top1']:.4f} loss {valid['loss']:.4f}", file=sys.stderr)

        self.on_main(write)
        self.state["epoch"], self.state["batch"] = epoch + 1, 0

    def finish(self) -> CellResult:
        # the last epoch's weights, before best.pt's replace them (only rank 0 writes final.pt, where kept)
        kept = kept_weights(self.cfg.keep)
        keep_final = self.world.main and "final" in kept
        final = {k: v.detach().clone() for k, v in self.model.state_dict().items()} if keep_final else None
        best_pt = checkpoint.load(self.run_dir / rundir.BEST) if self.world.main else None
        box = [best_pt["model"] if best_pt else None]
        if distributed.active():
            torch.distributed.broadcast_object_list(box, src=0)
        best_weights = box[0]
        if best_weights is None:
            raise RuntimeError(f"{self.run_dir / rundir.BEST} holds no weights")
        self.model.load_state_dict(best_weights)
        test = self.evaluate("test", self.model)
        seconds = self.state["seconds"] + time.time() - self.t0
        best = self.state["best"]
        if best is None:
            raise RuntimeError("finished without a validation epoch (epochs must be at least 1)")
        result = CellResult(
            config=config_dict(self.cfg),
            classes=self.classes,
            valid=BestValid(top1_best=best["top1"], best_epoch=best["epoch"]),
            test=test,
            epochs=self.state["epoch"],
            steps=self.state["step"],
            world_size=self.world.size,
            seconds=seconds,
            histokt_version=__version__,
            runtime=provenance.runtime(torch.__version__),
        )

        def write() -> None:
            if "final" in kept:
                checkpoint.save_weights(self.run_dir / rundir.FINAL, {"model": final, "epoch": self.state["epoch"] - 1})
            rundir.write_result(self.run_dir, result)
            rundir.drop_training_state(self.run_dir, self.cfg.keep)

        self.on_main(write)
        return result
