"""Optimizers and LR schedules of the HistoKT recipes (docs/method.md §3).

``Adas`` (paper Stage A, histokt.train.adas) is momentum SGD with one learning rate per parameter that its own
schedule, ``AdasSchedule``, sets once per epoch from the layers' knowledge gain: ``build_scheduler`` returns it
for an ``Adas`` optimizer, whatever scheduler is named, so no StepLR acts on top of it.

``AdamP`` follows Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
Scale-invariant Weights" (ICLR 2021) and the behaviour of the reference ``adamp`` package that HistoKT
trained with: Adam moments with bias correction; for every tensor of rank > 1 whose gradient is nearly
orthogonal to the weight (the signature of a scale-invariant weight, e.g. a conv followed by BatchNorm),
the radial component of the update is removed and the decoupled weight decay is scaled by ``wd_ratio``.
"""

import math

import torch
import torch.nn.functional as F
from torch.optim import SGD, Adam, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, StepLR

from histokt.errors import UserError
from histokt.train.adas import Adas, AdasSchedule

OPTIMIZERS = ("adamp", "sgd", "adam", "adamw", "adas")
SCHEDULERS = ("step", "none")

# Paper Stage B (docs/method.md §3): AdamP betas, eps.
ADAMP_BETAS = (0.9, 0.999)
ADAMP_EPS = 1e-8


def _channel_view(x: torch.Tensor) -> torch.Tensor:
    """One row per output channel (dim 0); reshape, not view, so channels_last weights work too."""
    return x.reshape(x.size(0), -1)


def _layer_view(x: torch.Tensor) -> torch.Tensor:
    """The whole tensor as one row."""
    return x.reshape(1, -1)


def _project(p, grad, perturb, delta, wd_ratio, eps):
    """Remove the radial part of ``perturb`` if ``p`` looks scale-invariant; return (perturb, wd factor).

    The channel view is tried first, then the layer view; the first view in which every row's
    |cos(grad, p)| is below delta / sqrt(row length) wins. The threshold scales with 1/sqrt(dim) because
    that is the typical cosine between two random vectors of that dimension.
    """
    expand = [-1] + [1] * (p.dim() - 1)
    for view in (_channel_view, _layer_view):
        cosine = F.cosine_similarity(view(grad), view(p), dim=1, eps=eps).abs()
        if cosine.max() < delta / math.sqrt(view(p).size(1)):
            unit = p / view(p).norm(dim=1).view(expand).add(eps)
            radial = view(unit * perturb).sum(dim=1).view(expand)
            return perturb - unit * radial, wd_ratio
    return perturb, 1.0


class AdamP(Optimizer):
    """Adam with projected updates for scale-invariant weights and decoupled weight decay.

    Per parameter and step t (m, v: Adam moments; bc_i = 1 - beta_i^t):
      update = m / (sqrt(v) / sqrt(bc2) + eps)          (Nesterov: (beta1 m + (1 - beta1) g) in place of m)
      update, r = projection(update) if p.dim() > 1     (r = wd_ratio when projected, else 1)
      p *= 1 - lr * weight_decay * r
      p -= lr / bc1 * update
    Pure elementwise/reduction torch ops with no randomness, so steps are deterministic; the state is
    ``step`` (int), ``exp_avg``, ``exp_avg_sq`` per parameter, which ``state_dict`` round-trips.
    """

    def __init__(
        self, params, lr, betas=ADAMP_BETAS, eps=ADAMP_EPS, weight_decay=0, delta=0.1, wd_ratio=0.1, nesterov=False
    ):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"invalid epsilon: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            delta=delta,
            wd_ratio=wd_ratio,
            nesterov=nesterov,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _state(self, p):
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _update(self, p, group):
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("AdamP does not support sparse gradients")
        beta1, beta2 = group["betas"]
        state = self._state(p)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

        state["step"] += 1
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["step"]
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
        if group["nesterov"]:
            perturb = (beta1 * exp_avg + (1 - beta1) * grad) / denom
        else:
            perturb = exp_avg / denom

        # Biases and BN affine vectors (rank 1) are never projected: a single-channel row has no
        # meaningful "radial" direction to remove.
        wd_factor = 1.0
        if p.dim() > 1:
            perturb, wd_factor = _project(p, grad, perturb, group["delta"], group["wd_ratio"], group["eps"])

        # Decoupled decay, applied before the step as in the reference (AdamW order).
        if group["weight_decay"] > 0:
            p.mul_(1 - group["lr"] * group["weight_decay"] * wd_factor)
        p.add_(perturb, alpha=-group["lr"] / bias_correction1)


def _choices(names) -> str:
    return ", ".join(names)


def build_optimizer(name: str, params, lr: float, weight_decay: float = 5e-4, momentum: float = 0.9) -> Optimizer:
    """The optimizer ``name`` (case-insensitive) over ``params``.

    adamp: paper Stage B (betas 0.9/0.999, eps 1e-8, decoupled wd, delta 0.1, wd_ratio 0.1).
    adas:  paper Stage A: momentum SGD with L2 weight decay added to the gradient and a per-parameter LR
           (one param group per tensor, in the given order: pass ``model.parameters()``' order), which
           ``build_scheduler`` adapts per epoch; ``lr`` is eta_0.
    sgd:   momentum SGD with L2 weight decay added to the gradient (Adas without its per-layer LR
           adaptation). adam: L2 wd. adamw: decoupled wd. ``momentum`` is used by sgd and adas only.
    """
    key = str(name).strip().lower()
    if key not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose one of: {_choices(OPTIMIZERS)}")
    if not lr > 0:
        raise UserError(f"optimizer {key}: learning rate must be positive, got {lr}")
    if not weight_decay >= 0:
        raise UserError(f"optimizer {key}: weight decay must be >= 0, got {weight_decay}")
    if key == "adamp":
        return AdamP(params, lr=lr, betas=ADAMP_BETAS, eps=ADAMP_EPS, weight_decay=weight_decay)
    if key == "sgd":
        return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if key == "adas":
        return Adas(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if key == "adam":
        return Adam(params, lr=lr, weight_decay=weight_decay)
    return AdamW(params, lr=lr, weight_decay=weight_decay)


def _constant(epoch: int) -> float:
    """LR multiplier of the "none" schedule; a module-level function so the scheduler pickles."""
    return 1.0


def build_scheduler(name: str, optimizer: Optimizer, step_size: int, gamma: float) -> LRScheduler | AdasSchedule:
    """Per-epoch LR schedule: "step" = StepLR(step_size, gamma); "none" = constant LR.

    An ``Adas`` optimizer always gets its own ``AdasSchedule`` instead (KG-driven per-layer LRs, its global
    factor times ``gamma`` every ``step_size`` epochs, beta 0.98), whichever of the names is given.
    Call ``scheduler.step()`` once per epoch (paper Stage B: StepLR(20, 0.5); Stage A: Adas, 0.5 every 25).
    """
    key = str(name).strip().lower()
    if key not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose one of: {_choices(SCHEDULERS)}")
    adas = isinstance(optimizer, Adas)
    if key == "none" and not adas:
        return LambdaLR(optimizer, _constant)
    what = "adas" if adas else "step"
    if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
        raise UserError(f"scheduler {what}: step_size must be a positive integer (epochs), got {step_size!r}")
    if not 0 < gamma <= 1:
        raise UserError(f"scheduler {what}: gamma must be in (0, 1], got {gamma}")
    if isinstance(optimizer, Adas):
        return AdasSchedule(optimizer, step_size=step_size, gamma=gamma)
    return StepLR(optimizer, step_size=step_size, gamma=gamma)
