"""The paper's training numbers as data (docs/method.md §3), keyed by dataset card name.

Stage A (source training) in the original uses Adas (SGD with per-layer LRs from knowledge gain, halved
every 25 epochs). Here it is expressed with the optimizers of ``histokt.optim``: momentum SGD with L2 weight
decay at eta0 = 0.03 and a StepLR(25, 0.5) standing in for Adas' global factor. Stage B (transfer) is the
paper's AdamP + StepLR(20, 0.5) with a per-target LR.
"""

import copy

from histokt.errors import UserError
from histokt.protocol import TARGET_LR

TARGETS = ("adp", "bcss", "os", "crc", "ajlymph", "bach", "glas", "mhist", "pcam")

STAGE_A: dict[str, str | float | int | None] = {
    "optimizer": "sgd",
    "lr": 0.03,
    "weight_decay": 5e-4,
    "momentum": 0.9,
    "scheduler": "step",
    "step_size": 25,
    "gamma": 0.5,
    "epochs": 250,
    "batch_size": 64,
}

STAGE_B: dict[str, str | float | int | None] = {
    "optimizer": "adamp",
    "lr": None,  # per target: TARGET_LR
    "weight_decay": 5e-4,
    "momentum": 0.9,  # unused by AdamP (its beta1 is 0.9); kept so both recipes have the same keys
    "scheduler": "step",
    "step_size": 20,
    "gamma": 0.5,
    "epochs": 250,
    "batch_size": 64,
}

LR_GRID = (1e-3, 5e-4, 2e-4, 1e-4, 5e-5)

# Per-channel (R, G, B) mean and std of [0, 1] tensors, computed on each train split by the original's
# get_norm.py; "imagenet" is torchvision's.
NORM_STATS = {
    "adp": {"mean": (0.81233799, 0.64032477, 0.81902153), "std": (0.18129702, 0.25731668, 0.16800649)},
    "ajlymph": {"mean": (0.4598, 0.3748, 0.4612), "std": (0.1406, 0.1464, 0.1176)},
    "bach": {"mean": (0.6880, 0.5881, 0.8209), "std": (0.1632, 0.1841, 0.1175)},
    "bcss": {"mean": (0.7107, 0.4878, 0.6726), "std": (0.1788, 0.2152, 0.1615)},
    "crc": {"mean": (0.6976, 0.5340, 0.6687), "std": (0.2272, 0.2697, 0.2247)},
    "glas": {"mean": (0.7790, 0.5002, 0.7765), "std": (0.1638, 0.2418, 0.1281)},
    "mhist": {"mean": (0.7361, 0.6469, 0.7735), "std": (0.1812, 0.2303, 0.1530)},
    "os": {"mean": (0.8414, 0.6492, 0.7377), "std": (0.1379, 0.2508, 0.1979)},
    "pcam": {"mean": (0.6970, 0.5330, 0.6878), "std": (0.2168, 0.2603, 0.1933)},
    "imagenet": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
}

_STAGES: dict[str, dict[str, str | float | int | None]] = {"a": STAGE_A, "b": STAGE_B}


def _check_target(target: str) -> str:
    if target not in TARGET_LR:
        raise UserError(f"unknown target dataset {target!r}; choose one of: {', '.join(TARGETS)}")
    return target


def recipe(stage: str, target: str | None = None) -> dict:
    """A fresh copy of the Stage "A" or "B" recipe (case-insensitive).

    Stage B needs ``target`` and takes its LR from ``TARGET_LR``; Stage A's LR is the same for every
    dataset, so ``target`` is only validated there.
    """
    key = str(stage).strip().lower()
    if key not in _STAGES:
        raise UserError(f"unknown training stage {stage!r}; choose one of: A, B")
    out = copy.deepcopy(_STAGES[key])
    if target is not None:
        _check_target(target)
    if key == "b":
        if target is None:
            raise UserError(f"stage B needs a target dataset to pick its learning rate: one of {', '.join(TARGETS)}")
        out["lr"] = TARGET_LR[target]
    return out
