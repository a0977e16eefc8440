"""`histokt train`: one training cell (Stage A source training or Stage B transfer), exactly resumable.

``train`` checks the config, fills the recipe defaults and runs the cell in this process, in the process
group a launcher (torchrun, srun) set up, or in ``--nproc K`` local processes it spawns. Each rank runs
``run``: the run directory (histokt.train.rundir) and a Trainer (histokt.train.loop).
"""

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from histokt import protocol
from histokt.errors import UserError
from histokt.store import stage
from histokt.train import distributed, rundir
from histokt.train.config import TrainConfig, reading_from, resolved, stage_dir
from histokt.train.loop import Trainer
from histokt.train.outcome import Outcome
from histokt.train.signals import ForwardSignals


def check_config(cfg: TrainConfig) -> None:
    for name in ("epochs", "batch_size", "nproc", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UserError(f"--lr {cfg.lr}: must be a positive number")
    if not 0 < cfg.device_budget <= 1:
        raise UserError(f"--device-budget {cfg.device_budget}: give a fraction of free device memory, in (0, 1]")
    if cfg.data_on == "device" and cfg.augment and (cfg.crop or cfg.augment_on == "loader"):
        raise UserError("--data-on device warps on the device: it takes neither --crop nor --augment-on loader")
    if cfg.augment_on == "device" and cfg.crop:
        raise UserError("--crop needs --augment-on loader (the device warp has no crop)")
    if cfg.workers < 0:
        raise UserError(f"--workers {cfg.workers}: must be 0 or more")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {cfg.device!r}: choose auto, cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible here")
    stage_dir(cfg.stage_to)  # an unset $VARIABLE fails here, before any process starts


def train(cfg: TrainConfig) -> Outcome:
    """Run or resume the cell; with --nproc K > 1, spawn K local DDP processes."""
    check_config(cfg)
    cfg = resolved(cfg, card_of(cfg))
    world = distributed.from_environment()
    if world is None and cfg.nproc > 1:
        return _spawn(cfg)
    return run(cfg, world or distributed.World())


def card_of(cfg: TrainConfig) -> str | None:
    """The card of the dataset a cell trains on (its attrs), which some protocol defaults depend on; None
    where the store does not hold it yet (the Trainer then says what is wrong)."""
    from histokt.store.schema import dataset_attrs

    return protocol.card_of(dataset_attrs(cfg.store, cfg.dataset) or {})


def _spawn(cfg: TrainConfig) -> Outcome:
    import torch.multiprocessing as mp

    rundir.prepare_run_dir(cfg)  # fail fast, before any process starts
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
            return message  # rank 0's interrupted Outcome
        raise RuntimeError(message)
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a training process failed (exit codes {[p.exitcode for p in procs]})")
    done = rundir.read_result(Path(cfg.out))
    if done is None:
        raise RuntimeError(f"the training processes ended without writing {Path(cfg.out) / rundir.RESULT}")
    return Outcome.finished(done)


def _rank_main(cfg: TrainConfig, rank: int, port: int, errors: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        out = run(cfg, distributed.World(rank, cfg.nproc, rank))
        if out.interrupted and rank == 0:
            errors.put(("requeue", out))
    except UserError as exc:
        errors.put(("user", str(exc)))
    except BaseException as exc:
        errors.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))
        raise


def device_for(cfg: TrainConfig, world: distributed.World) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    index = device_index(world.local_rank, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def device_index(local_rank: int, visible: int) -> int:
    """The GPU of a rank among the ``visible`` ones of its node: its local rank where the node's tasks share
    every GPU (srun --gpus-per-node), the one GPU where the launcher bound each task to its own."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise UserError(
            f"local rank {local_rank} but {visible} GPUs visible on this node: run one task per GPU "
            f"(a stage's tasks_per_node is its gpus; srun --ntasks-per-node = --gpus-per-node)"
        )
    return local_rank


def run(cfg: TrainConfig, world: distributed.World) -> Outcome:
    """The training of one rank: a finished cell is a no-op, else a Trainer fits (or resumes) it."""
    run_dir = Path(cfg.out)
    if world.main:
        rundir.prepare_run_dir(cfg)
    done = rundir.read_result(run_dir)
    if done is not None:
        if world.main:
            rundir.drop_training_state(run_dir)  # a kill right after result.json left it behind
        return Outcome.finished(done)
    device = device_for(cfg, world)
    with staged_data(cfg, world) as data_cfg:  # before the process group: no collective waits on a copy
        distributed.init(world, device, run_dir)
        try:
            return Trainer(data_cfg, world, device).fit()
        finally:
            distributed.shutdown()


@contextlib.contextmanager
def staged_data(cfg: TrainConfig, world: distributed.World) -> Iterator[TrainConfig]:
    """The config the rank trains with: ``cfg``, or where staging is on (--stage-to, default $SLURM_TMPDIR)
    one that reads a node-local copy of the dataset (histokt.store.stage: every rank of a node uses the one
    copy) and still records ``cfg.store``. A --norm naming another dataset reads that one in place."""
    dest = stage_dir(cfg.stage_to)
    if dest is None:
        yield cfg
        return
    with stage.staged(cfg.store, cfg.dataset, dest, verbose=world.local_rank == 0) as root:
        if cfg.norm not in ("dataset", "imagenet", "none", cfg.dataset):
            stage.link_dataset(root, cfg.store, cfg.norm)
        yield reading_from(cfg, root)


__all__ = ["Outcome", "TrainConfig", "train"]
