"""How a cell computes: its precision, chosen once at the cell's first start and kept by every resume.

``--precision auto`` is bf16 autocast where the GPU has bf16 tensor cores (Ampere and later), else fp16
autocast with a gradient scaler where it has fp16 tensor cores (V100, T4), else fp32; the CPU trains in
fp32. The choice, with the compile flag and where the augmentation warp runs, is stored in every
checkpoint as ``settings`` and recorded in result.json, so a cell requeued onto another GPU type resumes
with the settings it started with (an exact resume) instead of choosing again.
"""

from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypedDict

import torch

from histokt.errors import UserError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TENSOR_CORES_FP16 = (7, 0)  # Volta: below it fp16 autocast is no faster than fp32


class Settings(TypedDict):
    """What a cell fixed at its first start (checkpoint key ``settings``, result.json ``settings``)."""

    precision: str  # bf16, fp16 or fp32
    compile: bool
    warp: str  # where the augmentation's affine warp runs: "device" or "loader" (Pillow in the workers)


class Capability(TypedDict):
    """What a device can run (a test fakes it)."""

    type: str  # cuda or cpu
    bf16: bool
    fp16: bool


def capability(device: torch.device) -> Capability:
    if device.type != "cuda":
        return {"type": device.type, "bf16": True, "fp16": True}
    major_minor = torch.cuda.get_device_capability(device)
    return {
        "type": "cuda",
        "bf16": bool(torch.cuda.is_bf16_supported(including_emulation=False)),
        "fp16": major_minor >= TENSOR_CORES_FP16,
    }


def choose(requested: str, cap: Capability) -> str:
    """The precision ``--precision requested`` means on a device of capability ``cap``."""
    if requested not in PRECISIONS:
        raise UserError(f"--precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        if cap["type"] != "cuda":
            return "fp32"
        return "bf16" if cap["bf16"] else "fp16" if cap["fp16"] else "fp32"
    if requested != "fp32" and not cap[requested]:  # type: ignore[literal-required]
        raise UserError(f"--precision {requested}: this {cap['type']} device cannot run it; use auto or fp32")
    return requested


def cannot_run(settings: Settings | None, cap: Capability, where: str) -> str | None:
    """Why a device of capability ``cap`` cannot run a cell's settings (one line), or None where it can."""
    p = settings["precision"] if settings else "fp32"
    if p == "fp32" or cap[p]:  # type: ignore[literal-required]
        return None
    return (
        f"{where}: the cell started in {p} and this {cap['type']} device cannot run {p}; resume it on a GPU that "
        f"can (or start the cell again in a new run directory)"
    )


def autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    dtype = _DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler for fp16 (its range needs one), a pass-through otherwise. In fp16 the scaler's step reads
    its overflow check on the host each step (GradScaler; fused optimizers would avoid it, AdamP is not one):
    a V100 or T4 syncs every step, bf16 GPUs do not."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def allow_tf32(precision: str) -> None:
    """fp32 means fp32: convolutions and matmuls on Ampere and later GPUs run in TF32 (10-bit mantissa) unless
    told not to, which is neither the paper's V100 fp32 nor what a cell records. The lower precisions keep TF32
    for what autocast leaves in fp32. Set per cell, as a pool worker runs cells of either kind in turn."""
    tf32 = precision != "fp32"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
