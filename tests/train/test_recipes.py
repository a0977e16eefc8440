"""The paper's recipe numbers (method.md §3)."""

import pytest
import torch

from histokt.errors import UserError
from histokt.train.optim import build_optimizer, build_scheduler
from histokt.train.recipes import LR_GRID, NORM_STATS, STAGE_A, STAGE_B, TARGET_LR, TARGETS, recipe

KEYS = {"optimizer", "lr", "weight_decay", "momentum", "scheduler", "step_size", "gamma", "epochs", "batch_size"}


def test_stage_recipes_match_method():
    assert set(STAGE_A) == set(STAGE_B) == KEYS
    assert (STAGE_A["optimizer"], STAGE_A["lr"]) == ("sgd", 0.03)
    assert (STAGE_A["momentum"], STAGE_A["weight_decay"]) == (0.9, 5e-4)
    assert (STAGE_A["scheduler"], STAGE_A["step_size"], STAGE_A["gamma"]) == ("step", 25, 0.5)
    assert (STAGE_B["optimizer"], STAGE_B["weight_decay"]) == ("adamp", 5e-4)
    assert (STAGE_B["scheduler"], STAGE_B["step_size"], STAGE_B["gamma"]) == ("step", 20, 0.5)
    for stage in (STAGE_A, STAGE_B):
        assert (stage["epochs"], stage["batch_size"]) == (250, 64)


def test_target_lr_table_and_grid():
    assert set(TARGET_LR) == set(TARGETS)
    assert TARGET_LR["adp"] == 1e-4 and TARGET_LR["bcss"] == 1e-3 and TARGET_LR["bach"] == 5e-5
    assert TARGET_LR["ajlymph"] == 2e-4 and TARGET_LR["crc"] == 5e-4 and TARGET_LR["pcam"] == 1e-3
    assert LR_GRID == (1e-3, 5e-4, 2e-4, 1e-4, 5e-5)
    assert set(TARGET_LR.values()) <= set(LR_GRID)


def test_norm_stats():
    assert set(NORM_STATS) == set(TARGETS) | {"imagenet"}
    assert NORM_STATS["adp"]["mean"] == (0.81233799, 0.64032477, 0.81902153)
    assert NORM_STATS["os"]["std"] == (0.1379, 0.2508, 0.1979)
    assert NORM_STATS["imagenet"] == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    for stats in NORM_STATS.values():
        assert len(stats["mean"]) == len(stats["std"]) == 3


def test_recipe_returns_fresh_copies():
    b = recipe("B", "mhist")
    assert b["lr"] == 5e-4 and b["optimizer"] == "adamp"
    b["lr"] = 1.0
    assert STAGE_B["lr"] is None and recipe("b", "mhist")["lr"] == 5e-4
    a = recipe("A", "crc")
    assert a == STAGE_A and a is not STAGE_A
    assert recipe("a") == STAGE_A


@pytest.mark.parametrize(
    "args, match",
    [
        (("C",), "unknown training stage"),
        (("B",), "needs a target"),
        (("B", "imagenet"), "unknown target"),
        (("A", "ADP"), "unknown target"),
    ],
)
def test_recipe_errors(args, match):
    with pytest.raises(UserError, match=match):
        recipe(*args)


def test_recipes_build():
    """Each recipe's fields feed build_optimizer / build_scheduler as they are."""
    for r in (recipe("A"), recipe("B", "glas")):
        opt = build_optimizer(
            r["optimizer"], [torch.nn.Parameter(torch.zeros(2))], r["lr"], r["weight_decay"], r["momentum"]
        )
        sched = build_scheduler(r["scheduler"], opt, r["step_size"], r["gamma"])
        assert opt.param_groups[0]["lr"] == r["lr"] and opt.param_groups[0]["weight_decay"] == r["weight_decay"]
        for _ in range(r["step_size"]):  # one step of the schedule: the LR falls by gamma exactly then
            assert opt.param_groups[0]["lr"] == pytest.approx(r["lr"])
            opt.step()
            sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(r["lr"] * r["gamma"])
