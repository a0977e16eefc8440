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
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from tqdm import tqdm

from histokt import __version__, atomic, protocol, provenance
from histokt.errors import UserError
from histokt.result import BestValid, CellResult
from histokt.store import resident
from histokt.store.augment import Augment, warp_batch
from histokt.store.reader import PatchDataset, make_loader
from histokt.store.sampler import GlobalBatchSampler, eval_rows, eval_shards
from histokt.store.schema import SPLITS, open_attrs
from histokt.train import checkpoint, distributed, precision, rundir
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


# Steps between host syncs on a GPU (the non-finite loss check, and the one collective that has every rank
# stop, fail or save at the same step): a sync each step idles the GPU while the host waits. ~0.3 s of steps
# at ResNet18 speed, so a stop signal is acted on at once. On the CPU a sync costs nothing: every step.
SYNC_EVERY_CUDA = 16


class EpochKeys:
    """Fixed evaluation batches whose keys carry the epoch (set before each pass), so that augmented
    validation images follow it in the loader's workers, which never see the main process's state."""

    def __init__(self, batches: list[list[int]]):
        self.batches, self.epoch = batches, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return ([(self.epoch, i) for i in batch] for batch in self.batches)


def host_sync_every(device: torch.device) -> int:
    return SYNC_EVERY_CUDA if device.type == "cuda" else 1


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
        self.sync_every = host_sync_every(device)
        self._read_dataset()
        ckpt = self._load_checkpoint()
        self.settings = self._settings(ckpt)
        precision.allow_tf32(self.settings["precision"])
        self._seed()
        self._build_model()
        self._build_optimizer()
        self._build_normalization()
        self._build_data()
        self.state = fresh_state()
        if ckpt is not None:
            self._resume(ckpt)

    # -- building, in this order (the seeded draws of model init and data order depend on it) -------------
    def _read_dataset(self) -> None:
        """Class names and kind of the target; every split must hold patches."""
        cfg = self.cfg
        attrs = open_attrs(cfg.store, cfg.dataset)
        self.dataset_attrs = attrs  # how the data was made: the deviations from the paper's data (result.json)
        self.classes, self.multi_label = list(attrs["classes"]), bool(attrs["multi_label"])
        for split in ("train", "valid", "test"):
            if int(attrs["counts"][split]) == 0:
                raise UserError(f"{cfg.store}/{cfg.dataset}: the {split} split is empty; re-standardize with more data")

    def _load_checkpoint(self) -> dict[str, Any] | None:
        """The newest checkpoint that loads, read before anything is built: its settings decide how."""
        ckpt, notes = checkpoint.load_latest(self.run_dir)
        for note in notes:
            if self.world.main:
                print(f"histokt train: warning: {note}", file=sys.stderr)
        if ckpt is not None and ckpt.get("arch") != self.cfg.arch:
            raise UserError(f"{self.run_dir}: checkpoint is for {ckpt.get('arch')!r}, not {self.cfg.arch!r}")
        return ckpt

    def _settings(self, ckpt: dict[str, Any] | None) -> precision.Settings:
        """Precision, compile and the warp's place: the checkpoint's on a resume, rank 0's choice on a first
        start (ranks on different GPU types compute alike). A rank whose device cannot run them stops every
        rank with one line (no rank left waiting in a collective)."""
        cap = precision.capability(self.device)
        problem = None
        settings: precision.Settings | None
        if ckpt is not None:
            settings = ckpt.get("settings") or self._settings_before_they_were_kept()
        else:
            try:
                settings = self._choose(cap)
            except UserError as exc:
                settings, problem = None, str(exc)
            settings = distributed.from_rank0(settings)
        problem = problem or precision.cannot_run(settings, cap, str(self.run_dir))
        if distributed.any_rank([problem is not None], self.device)[0]:
            raise UserError(problem or f"{self.run_dir}: another rank cannot run this cell (its line says why)")
        assert settings is not None
        return settings

    def _choose(self, cap: precision.Capability) -> precision.Settings:
        cfg = self.cfg
        on_device = cfg.augment_on == "device" or (
            cfg.augment_on == "auto" and not cfg.crop and (self.cuda or cfg.data_on == "device")
        )
        return {
            "precision": precision.choose(cfg.precision, cap),
            "compile": bool(cfg.compile),
            "warp": "device" if on_device else "loader",
        }

    def _settings_before_they_were_kept(self) -> precision.Settings:
        """A checkpoint of a histokt that did not store settings: what that version ran on this device."""
        cfg = self.cfg
        on_device = cfg.augment_on == "device" or (cfg.augment_on == "auto" and self.cuda and not cfg.crop)
        return {
            "precision": "bf16" if self.cuda and cfg.precision in ("auto", "bf16") else "fp32",
            "compile": bool(cfg.compile),
            "warp": "device" if on_device else "loader",
        }

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
        net: torch.nn.Module = self.model
        if world.size > 1:
            ids = [device.index] if self.cuda else None
            net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if self.settings["compile"]:
            net = torch.compile(net)  # type: ignore[assignment]  # torch's stub types it as a callable
        self.net = net

    def _build_optimizer(self) -> None:
        from histokt.train.optim import build_optimizer, build_scheduler

        cfg = self.cfg
        name, lr, step_size = _recipe(cfg)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(name, params, lr, cfg.weight_decay, cfg.momentum)
        self.scheduler = build_scheduler(cfg.scheduler, self.optimizer, step_size, cfg.gamma)
        self.scaler = precision.grad_scaler(self.settings["precision"], self.device)

    def _build_normalization(self) -> None:
        """Per-channel mean and 1/std of the chosen statistics, for uint8 pixels, on the device."""
        from histokt.store.normstats import norm_constants

        mean, std = norm_constants(self.cfg.store, self.cfg.dataset, self.cfg.norm)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255.0)

    def _build_data(self) -> None:
        """The training set (in device memory, or read by loader workers), its loss, sampler and loader."""
        from histokt.train.metrics import loss_fn, multilabel_pos_weights

        cfg, world = self.cfg, self.world
        augment = Augment(seed=cfg.seed, crop=cfg.crop) if cfg.augment else None
        # the original chose checkpoints on validation images under the training transform (--valid-transform
        # train): draws of their own, from (seed, epoch, index), so a resumed run sees the same images
        augmented = cfg.valid_transform == "train" and cfg.augment  # --no-augment: no transform to validate under
        self.valid_augment = Augment(seed=cfg.seed, crop=cfg.crop, stream=1) if augmented else None
        on_device = self.settings["warp"] == "device"
        self.resident = self._data_on_device()
        self.eval_data: dict[str, Any] = {}  # split -> its ResidentSplit, or a loader made on first use
        if self.resident:
            split = resident.ResidentSplit(
                cfg.store, cfg.dataset, "train", self.device, augment=augment, progress=self._progress()
            )
            train_set = split.dataset
            counts = self.dataset_attrs["counts"]
            for name in ("valid", "test"):  # a rank evaluates only its shard: it holds only that
                rows = eval_rows(int(counts[name]), world.size, world.rank)
                draws = self.valid_augment if name == "valid" else None
                self.eval_data[name] = resident.ResidentSplit(
                    cfg.store, cfg.dataset, name, self.device, rows=rows, augment=draws
                )
        else:
            train_set = PatchDataset(
                cfg.store, cfg.dataset, "train", augment=augment, augment_on_device=on_device, recycle=True
            )
        weights = multilabel_pos_weights(train_set.labels) if self.multi_label else None
        self.loss = loss_fn(self.multi_label, weights).to(self.device)
        self.eval_loss = loss_fn(self.multi_label, weights)  # on the CPU, where gathered outputs are
        self.sampler = GlobalBatchSampler(len(train_set), cfg.batch_size, world.size, world.rank, cfg.seed)
        if self.resident:
            self.loader: Any = resident.ResidentLoader(split, self.sampler)
        else:
            self.loader = make_loader(train_set, batch_sampler=self.sampler, workers=cfg.workers, pin_memory=self.cuda)

    def _data_on_device(self) -> bool:
        """--data-on: device, loader, or auto: the device on CUDA where the three splits fit in the budget
        on every rank (each rank holds the whole training split, as any sample of a global batch may fall to
        it, and its own shard of valid and test). Only where the warp runs on the device (settings)."""
        cfg = self.cfg
        warp_ok = not cfg.augment or self.settings["warp"] == "device"
        if cfg.data_on == "device" and not warp_ok:
            raise UserError(
                f"{self.run_dir}: --data-on device: this cell started with the augmentation warp in the loader "
                f"(kept for an exact resume); resume it with --data-on loader or auto"
            )
        if cfg.data_on != "auto":
            return cfg.data_on == "device"
        need = sum(resident.split_nbytes(cfg.store, cfg.dataset, s) for s in SPLITS)
        fits = self.cuda and warp_ok and need <= cfg.device_budget * resident.free_memory(self.device)
        return not distributed.any_rank([not fits], self.device)[0]

    def _progress(self) -> bool:
        return bool(self.cfg.progress and self.world.main)

    # -- state -------------------------------------------------------------------------------------------
    def _resume(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        checkpoint.set_rng_state(ckpt["rng"])
        self.state = state_of(ckpt)
        self._prime_gradient_buckets()
        if self.world.main:  # the log says where an interrupted or crashed attempt is picked up
            print(
                f"histokt train: {self.run_dir}: resuming at step {self.state['step']} (epoch {self.state['epoch']}, "
                f"batch {self.state['batch']})",
                file=sys.stderr,
                flush=True,
            )

    def _prime_gradient_buckets(self) -> None:
        """DDP reduces a fresh process's first backward in one bucket and regroups the gradients in the order
        they came for the steps after; over more than two ranks another grouping sums in another order. A
        resumed run's first step would so round otherwise than the uninterrupted run's: one throwaway pass
        (zero loss, BatchNorm statistics put back, gradients dropped) makes DDP regroup before it."""
        if self.world.size < 3:
            return  # a sum of two is the same in either order
        kept = [b.detach().clone() for b in self.model.buffers()]
        self.net.train()
        self.apply_bn_mode(self.model)
        x = torch.zeros((2, 3, 64, 64), device=self.device).to(memory_format=self.memory_format)
        with self._autocast():
            (self.net(x).float().sum() * 0).backward()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, value in zip(self.model.buffers(), kept, strict=True):
                buffer.copy_(value)

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
                    "scaler": self.scaler.state_dict(),  # {} but in fp16
                    "settings": dict(self.settings),
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
            disable=None if self._progress() else True,
        )
        finite = torch.ones((), dtype=torch.bool, device=self.device)  # every loss since the last check
        checked = self.state["step"]
        for batch in bar:
            finite &= torch.isfinite(self.step(*batch))
            self.state["step"] += 1
            self.state["batch"] += 1
            every = self.cfg.ckpt_every_steps and self.state["step"] % self.cfg.ckpt_every_steps == 0
            last = self.state["batch"] == len(self.sampler)
            if not (every or last or self.state["step"] % self.sync_every == 0):
                continue  # the same test on every rank: all of them check at the same steps
            timed = self.cfg.ckpt_every_min and time.time() - self.last_save > 60 * self.cfg.ckpt_every_min
            # one host sync and one collective: every rank stops, fails or saves at the same step
            halt, bad, periodic = distributed.any_rank([stop.flag, ~finite, bool(every or timed)], self.device)
            if bad:
                step = self.state["step"]
                where = f"step {step}" if checked + 1 == step else f"steps {checked + 1}-{step}"
                raise UserError(
                    f"loss is not finite at epoch {epoch} {where}; the last good checkpoint "
                    f"({self.run_dir / checkpoint.LAST}) is kept; lower --lr and run again with a new --out"
                )
            checked = self.state["step"]
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
        if params is not None:  # pinned by the loader: queued without a host sync (a blocking copy would wait)
            x = warp_batch(x.float(), params.to(self.device, non_blocking=True))
        x = x.to(memory_format=self.memory_format)
        return (x.float() - self.mean) * self.inv_std

    def _autocast(self) -> AbstractContextManager[object]:
        return precision.autocast(self.settings["precision"], self.device)

    def step(self, images: torch.Tensor, labels: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        """One optimizer step; the loss stays on the device (reading it would sync the host every step)."""
        x = self.to_device(images, params)
        y = labels.to(self.device, non_blocking=True)
        with self._autocast():
            loss = self.loss(self.net(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, split: str, model: torch.nn.Module, epoch: int = 0) -> dict[str, Any]:
        """Metrics of ``model`` on a whole split; every rank evaluates a shard, rank 0's BN stats. ``epoch``
        draws the augmentation of validation images under --valid-transform train."""
        from histokt.train.metrics import multi_label, single_label

        distributed.broadcast_buffers(model)
        model.eval()
        outs, ys = [], []
        for images, labels, *draws in self._eval_batches(split, epoch):
            with self._autocast():  # kept on the device: no sync per batch
                outs.append(model(self.to_device(images, *draws)).float())
            ys.append(labels)
        logits = distributed.gather_cat(torch.cat(outs).cpu() if outs else torch.empty(0, len(self.classes)))
        targets = distributed.gather_cat(torch.cat(ys).cpu() if ys else torch.empty(0, dtype=torch.int64))
        metrics = multi_label(logits, targets) if self.multi_label else single_label(logits, targets, len(self.classes))
        metrics["loss"] = float(self.eval_loss(logits, targets))
        return metrics

    def _eval_batches(self, split: str, epoch: int) -> Any:
        """This rank's evaluation batches of ``split``: from device memory, or from a loader kept between
        epochs (its workers read while the device computes); augmented validation batches carry their draws."""
        held = self.eval_data.get(split)
        augment = self.valid_augment if split == "valid" else None
        if isinstance(held, resident.ResidentSplit):
            n, b, start = len(held), self.cfg.eval_batch_size, held.rows.start
            if augment is not None:
                return (
                    held.batch([(epoch, i) for i in range(start + a, start + min(n, a + b))]) for a in range(0, n, b)
                )
            return (held.rows_batch(start + a, start + min(n, a + b)) for a in range(0, n, b))
        if held is None:
            on_device = self.settings["warp"] == "device"
            data = PatchDataset(self.cfg.store, self.cfg.dataset, split, augment=augment, augment_on_device=on_device)
            shards = EpochKeys(eval_shards(len(data), self.cfg.eval_batch_size, self.world.size, self.world.rank))
            held = make_loader(data, batch_sampler=shards, workers=self.cfg.workers, pin_memory=self.cuda)
            self.eval_data[split] = held
        keys: EpochKeys = held.batch_sampler  # type: ignore[assignment]  # the sampler this method gave it
        keys.epoch = epoch
        return held

    def end_epoch(self, epoch: int) -> None:
        self.scheduler.step()
        valid = self.evaluate("valid", self.model, epoch)
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
        config = config_dict(self.cfg)
        card = protocol.card_of(self.dataset_attrs) or self.cfg.dataset
        deviations = protocol.cell_deviations(card, config, self.settings, self.dataset_attrs)
        result = CellResult(
            config=config,
            classes=self.classes,
            valid=BestValid(top1_best=best["top1"], best_epoch=best["epoch"]),
            test=test,
            epochs=self.state["epoch"],
            steps=self.state["step"],
            world_size=self.world.size,
            seconds=seconds,
            histokt_version=__version__,
            runtime=provenance.runtime(torch.__version__),
            settings=dict(self.settings),
            protocol=self.cfg.protocol,
            deviations=[d.to_json() for d in deviations],
        )

        def write() -> None:
            if "final" in kept:
                checkpoint.save_weights(self.run_dir / rundir.FINAL, {"model": final, "epoch": self.state["epoch"] - 1})
            rundir.write_result(self.run_dir, result)
            rundir.drop_training_state(self.run_dir, self.cfg.keep)

        self.on_main(write)
        return result
