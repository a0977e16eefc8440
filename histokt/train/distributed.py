"""Process-group set-up and the few collectives the training loop needs, for 1..N processes.

The world comes from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK), from SLURM's when srun
started several tasks (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), or from ``--nproc K`` on one
machine. gloo on CPU, NCCL on GPU. With one process nothing is initialised and every collective is a
no-op, so the same loop serves all cases.
"""

import os
import re
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


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


def init(world: World, device: torch.device) -> None:
    """Join the process group (nothing to do for a world of one)."""
    if world.size == 1:
        return
    os.environ.setdefault("MASTER_ADDR", first_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
    # srun tasks of one job agree on a port derived from the job id (stable across requeues)
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 40000))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size)


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
