"""Process-group set-up and the few collectives the training loop needs, for 1..N processes.

The world comes from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK), from SLURM's when srun
started several tasks (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), or from ``--nproc K`` on one
machine. gloo on CPU, NCCL on GPU. With one process nothing is initialised and every collective is a
no-op, so the same loop serves all cases.

Where the ranks meet: a launcher that names MASTER_ADDR and MASTER_PORT (torchrun, ``--nproc``) decides.
srun names neither, so the tasks of a step meet through the cell's run directory, which every node sees:
rank 0 opens the rendezvous store on a port its own host's kernel picks (so two cells whose rank 0 share a
node never collide, whatever their job ids) and leaves ``host port`` in ``RUN_DIR/.rendezvous-<attempt>``;
the other ranks wait for that file, connect, and rank 0 removes it once all have.
"""

import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from histokt import atomic


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_environment() -> World | None:
    """The world a launcher (torchrun or srun) set up, or None for a plain single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return None


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list such as 'gpu[03-05,7],cpu1' (without needing scontrol)."""
    m = re.match(r"([^\[,]+)(\[([0-9]+))?", nodelist)
    if not m:
        return "127.0.0.1"
    return m.group(1) + (m.group(3) or "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RENDEZVOUS_TIMEOUT_S = 600.0  # how long ranks wait for each other (rank 0 may be copying the dataset first)
POLL_S = 0.2


def init(world: World, device: torch.device, meeting: Path | None = None) -> None:
    """Join the process group (nothing to do for a world of one): at the launcher's MASTER_ADDR/PORT where it
    names them, else through ``meeting`` (the run directory: ``rendezvous``)."""
    if world.size == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    named = "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ
    if named or meeting is None:
        os.environ.setdefault("MASTER_ADDR", first_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        os.environ.setdefault("MASTER_PORT", "29500")  # torchrun's default
        dist.init_process_group(backend, rank=world.rank, world_size=world.size)
        return
    store = rendezvous(world, meeting)
    dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.size)


def attempt() -> str:
    """This launch of the job step, as the tasks of one step (and no other) agree: job, step and requeue count."""
    env = os.environ
    return f"{env.get('SLURM_JOB_ID', '0')}.{env.get('SLURM_STEP_ID', '0')}.{env.get('SLURM_RESTART_COUNT', '0')}"


def rendezvous(world: World, folder: Path, timeout_s: float = RENDEZVOUS_TIMEOUT_S) -> dist.TCPStore:
    """The store every rank of this launch connects to: rank 0 serves it on a port its kernel picks and
    leaves its address in ``folder/.rendezvous-<attempt>``; the others read it there."""
    path = Path(folder) / f".rendezvous-{attempt()}"
    timeout = timedelta(seconds=timeout_s)
    if world.main:
        for stale in Path(folder).glob(".rendezvous-*"):  # a killed attempt's: nobody reads it again
            stale.unlink(missing_ok=True)
        store = dist.TCPStore("0.0.0.0", 0, world.size, True, timeout=timeout, wait_for_workers=False)
        # the host name, as the other nodes resolve it (the node's NCCL/gloo interface: README, cluster guide)
        atomic.write_bytes(path, f"{socket.gethostname()} {store.port}\n".encode())
        store.wait([f"histokt/joined/{r}" for r in range(1, world.size)])
        path.unlink(missing_ok=True)
        return store
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: rank 0 did not open the rendezvous in {timeout_s:.0f} s")
        time.sleep(POLL_S)
    host, port = path.read_text().split()
    store = dist.TCPStore(host, int(port), world.size, False, timeout=timeout)
    store.set(f"histokt/joined/{world.rank}", "1")
    return store


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def any_rank(flags: list[bool | torch.Tensor], device: torch.device) -> list[bool]:
    """Element-wise OR over ranks: every rank takes the same decision at the same step. A flag may be a
    0-d tensor on ``device``: all of them are read in one host sync."""
    t = torch.stack([torch.as_tensor(f, device=device).reshape(()).float() for f in flags])
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object); ``value`` itself outside a process group."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a CPU tensor from every rank, in rank order (evaluation outputs)."""
    if not active():
        return tensor
    parts: list[torch.Tensor | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat([p for p in parts if p is not None])


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's BatchNorm statistics everywhere, so every rank evaluates the same model."""
    if not active():
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


class CpuSyncBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm over the global batch for CPU process groups (torch's SyncBatchNorm is GPU-only).

    Sums and squared sums travel through a differentiable all_reduce, so gradients are those of one
    process holding the whole batch once DDP averages them.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        local = torch.tensor([x.numel() / c], dtype=x.dtype)
        stats = all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), local]))
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c : 2 * c] / n - mean * mean
        running_mean, running_var, batches, m = self._running()
        with torch.no_grad():
            running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
            batches.add_(1)
        shape = (1, c, 1, 1)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)

    def _running(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """The running statistics and momentum: convert_sync_batchnorm converts only BatchNorms that keep them."""
        m, mean, var, batches = self.momentum, self.running_mean, self.running_var, self.num_batches_tracked
        if m is None or mean is None or var is None or batches is None:
            raise ValueError("CpuSyncBatchNorm needs running statistics and a momentum (not a cumulative average)")
        return mean, var, batches, m


def convert_sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """BatchNorm layers synchronised across the process group: torch's on GPU, ours on CPU."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, torch.nn.BatchNorm2d) and type(child) is torch.nn.BatchNorm2d:
            sync = CpuSyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(model, name, sync)
        else:
            convert_sync_batchnorm(child, device)
    return model
