"""Adas: momentum SGD with a per-layer learning rate driven by the knowledge gain (docs/method.md §3, §4.4).

Stage A (source training) of HistoKT trains with Adas (Hosseini & Plataniotis, "AdaS: Adaptive Scheduling of
Stochastic Gradients", arXiv 2006.06587; the reference code ``src/adas/optim/adas.py`` with ``linear: False``,
``p = 1``). It is two things:

* the **step** (``Adas``): SGD with momentum (dampening 0) and L2 weight decay added to the gradient, each
  tensor k with its own learning rate eta_k (one param group per parameter, in ``model.parameters()`` order):
      d = g + wd * w;  buf = d (first step) else momentum * buf + d;  w -= eta_k * buf
  which is ``torch.optim.SGD``'s arithmetic, so the step is torch's own;

* the **per-epoch update of eta** (``AdasSchedule``, called once at each epoch's end as a scheduler):
  for every scored conv layer k (a 4-D weight whose kernel is not 1 x 1), with G_k(t) its knowledge gain
  (G = (G_in + G_out) / 2, EVBMF of the input- and output-channel unfoldings, p = 1; ``histokt.distill.evbmf``):
      epoch 0:   Delta_k = eta_0                    (with v_k = 0 before, so v_k = eta_0)
      epoch t>0: Delta_k = G_k(t) - G_k(t-1), but while layer k is "not ready" (its KG has been ~0 at every
                 epoch t >= 1 so far): Delta_k = eta_0 - beta * v_k, if |G_k(t)| <= KG_ZERO, else it
                 becomes ready for good and keeps Delta_k = G_k(t) - G_k(t-1)
      every step_size epochs (t > 0, t % step_size == 0): zeta *= gamma (and every eta is multiplied by gamma
                 before being overwritten below: this only shows where the first parameter is masked)
      v_k   <- max(beta * v_k + zeta * Delta_k, 1e-10)
      eta_k  = v_k for scored conv layers; every other parameter (BN, biases, fc, 1 x 1 convs) takes the eta
               of the parameter before it in ``model.parameters()`` order (the first one keeps its own).
  Values of the paper: eta_0 0.03, beta 0.98, gamma 0.5, step_size 25, momentum 0.9, wd 5e-4.

"Not ready": the reference tests ``np.isclose(KG, 0)``, i.e. |KG| <= 1e-8 (``KG_ZERO``). A retained EVBMF
component contributes at least 1/N >= 1/512 to a layer's KG, so any threshold far below that is the same rule.
(The reference removes ready layers from its ``not_ready`` list while iterating over it, which skips the check
of the layer right after each one removed in that epoch; that is a bug of the reference, not its documented
rule, and is not reproduced: every not-ready layer is checked at every epoch.)

All state that the update needs (epoch counter, zeta, velocities, last KGs, ready flags) is in
``AdasSchedule.state_dict`` as Python numbers; the learning rates are in the optimizer's param groups (its
``state_dict``), so a resumed run continues bit for bit. The KG is computed in float64 numpy from CPU copies of
the (on every DDP rank identical) weights, so all ranks compute the same learning rates.
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import SGD

from histokt.distill.evbmf import layer_metrics
from histokt.train import distributed

BETA = 0.98  # paper Stage A
KG_ZERO = 1e-8  # |KG| at or below: "not ready" (the reference's np.isclose(KG, 0), atol 1e-8)
VELOCITY_FLOOR = 1e-10  # the reference's floor of the velocity, so no learning rate reaches 0


Gains = tuple[float | None, float | None]


def layer_kg(weight: torch.Tensor) -> Gains:
    """(G_in, G_out) of a conv layer from EVBMF of its two unfoldings, p = 1; None for an unfolding where EVBMF
    keeps no component or fails (the schedule then keeps that unfolding's previous value). The reference's
    bounded noise search: Adas is the paper's Stage-A optimizer, and its learning rates follow the gains the AdaS
    code computed, wrong minima included (distillation defaults to the grid search instead)."""
    m = layer_metrics(weight, p=1, search="reference")
    return (m.inp.kg if m.inp.rank else None, m.out.kg if m.out.rank else None)


def is_scored(param: torch.Tensor) -> bool:
    """Whether Adas adapts this tensor's LR from its KG: a 4-D conv weight whose kernel is not 1 x 1
    (the reference masks every other tensor, 1 x 1 convs included, with ``linear: False``)."""
    return param.dim() == 4 and param.shape[2] != 1 and param.shape[3] != 1


class Adas(SGD):
    """Momentum SGD with L2 weight decay and one param group, hence one learning rate, per parameter.

    ``params``: tensors in ``model.parameters()`` order (the order the per-layer update relies on). The step is
    ``torch.optim.SGD``'s (dampening 0, no Nesterov); ``AdasSchedule`` sets the learning rates once per epoch.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.9, weight_decay: float = 5e-4):
        tensors = list(params)
        if not tensors or not all(isinstance(p, torch.Tensor) for p in tensors):
            raise ValueError("Adas needs a non-empty sequence of parameter tensors (one group each)")
        super().__init__(
            [{"params": [p]} for p in tensors], lr=lr, momentum=momentum, dampening=0, weight_decay=weight_decay
        )

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters, in the order they were given."""
        return [group["params"][0] for group in self.param_groups]


class AdasSchedule:
    """The per-epoch learning-rate update of Adas (module docstring); call ``step()`` once at each epoch's end.

    ``kg``: the knowledge gain of one weight: a number, or (G_in, G_out) with None where an unfolding has no
    value (default ``layer_kg``, EVBMF). ``eta_0`` is the optimizer's ``lr``. Under DDP rank 0 computes the gains
    and sends them: ranks whose BLAS rounds differently must still agree on every learning rate.
    """

    def __init__(
        self,
        optimizer: Adas,
        step_size: int = 25,
        gamma: float = 0.5,
        beta: float = BETA,
        kg: Callable[[torch.Tensor], float | Gains] | None = None,
    ):
        if not isinstance(optimizer, Adas):
            raise TypeError(f"AdasSchedule needs an Adas optimizer, got {type(optimizer).__name__}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Adas beta must be in [0, 1), got {beta}")
        self.optimizer = optimizer
        self.kg = kg if kg is not None else layer_kg
        self.scored = [i for i, p in enumerate(optimizer.params) if is_scored(p)]
        layers = len(self.scored)
        self.init_lr = float(optimizer.defaults["lr"])
        self.step_size, self.gamma, self.beta = step_size, float(gamma), float(beta)
        self.epoch = 0  # epochs whose end has been processed
        self.zeta = 1.0
        self.velocity = [0.0] * layers
        self.last_kg = [0.0] * layers
        self.last_pair = [(0.0, 0.0)] * layers  # each layer's last (G_in, G_out)
        self.ready = [False] * layers

    def step(self) -> None:
        """The update at the end of epoch ``self.epoch``: new velocities, then every param group's lr."""
        params = self.optimizer.params
        main = not distributed.active() or torch.distributed.get_rank() == 0
        measured = distributed.from_rank0([self.kg(params[i]) for i in self.scored] if main else None)
        kg = [self._gain(k, value) for k, value in enumerate(measured)]
        if self.epoch == 0:
            delta = [self.init_lr] * len(kg)
        else:
            delta = [new - old for new, old in zip(kg, self.last_kg)]
            for k, value in enumerate(kg):
                if not self.ready[k]:
                    if abs(value) <= KG_ZERO:
                        delta[k] = self.init_lr - self.beta * self.velocity[k]
                    else:
                        self.ready[k] = True
        self.last_kg = kg

        lrs = [group["lr"] for group in self.optimizer.param_groups]
        if self.epoch > 0 and self.epoch % self.step_size == 0:
            lrs = [lr * self.gamma for lr in lrs]
            self.zeta *= self.gamma
        self.velocity = [max(self.beta * v + self.zeta * d, VELOCITY_FLOOR) for v, d in zip(self.velocity, delta)]
        velocity = dict(zip(self.scored, self.velocity))
        for i in range(len(lrs)):
            lrs[i] = velocity[i] if i in velocity else lrs[max(i - 1, 0)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.epoch += 1

    def _gain(self, k: int, value: float | Gains) -> float:
        """Layer k's KG: ``value``, or the mean of its two unfoldings' gains where an unfolding without a value
        keeps its previous one (method.md §4.4: "if r = 0 or the factorization fails: previous epoch's value")."""
        if not isinstance(value, tuple):
            return float(value)
        pair = tuple(old if new is None else float(new) for new, old in zip(value, self.last_pair[k]))
        self.last_pair[k] = (pair[0], pair[1])
        return (pair[0] + pair[1]) / 2

    def get_last_lr(self) -> list[float]:
        """The learning rate of every parameter, in order (as ``LRScheduler.get_last_lr``)."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Everything but the optimizer and the KG function, as Python numbers (weights_only-loadable)."""
        return {
            "epoch": self.epoch,
            "zeta": self.zeta,
            "velocity": list(self.velocity),
            "last_kg": list(self.last_kg),
            "last_pair": [list(p) for p in self.last_pair],
            "ready": list(self.ready),
            "scored": list(self.scored),
            "init_lr": self.init_lr,
            "step_size": self.step_size,
            "gamma": self.gamma,
            "beta": self.beta,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["scored"]) != self.scored:
            raise ValueError(
                f"Adas state of conv layers {list(state['scored'])} does not fit this model's {self.scored}"
            )
        self.epoch, self.zeta = int(state["epoch"]), float(state["zeta"])
        self.velocity = [float(v) for v in state["velocity"]]
        self.last_kg = [float(v) for v in state["last_kg"]]
        self.last_pair = [(float(a), float(b)) for a, b in state.get("last_pair", [(0.0, 0.0)] * len(self.scored))]
        self.ready = [bool(v) for v in state["ready"]]
        self.init_lr, self.step_size = float(state["init_lr"]), int(state["step_size"])
        self.gamma, self.beta = float(state["gamma"]), float(state["beta"])
