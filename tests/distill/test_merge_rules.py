"""The unit and condition rules of method.md §4.3 (c), (d) on a small hand-built ResNet whose per-layer
knowledge gains and mapping conditions are known by construction; --evbmf-search in the merge."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from histokt.distill import merge
from histokt.distill.evbmf import LayerMetrics, UnfoldingMetrics, layer_metrics
from histokt.distill.merge import (
    DistillConfig,
    SourceModel,
    _merge,
    conv_groups,
    distill,
    merge_unit,
    rule_weights,
    selection_kappa,
)
from histokt.errors import UserError
from histokt.train import checkpoint
from histokt.train.models import build_model


class TinyResNet(nn.Module):
    """torchvision's ResNet naming at small widths: stem conv1/bn1, layer1 (2 blocks of 16), layer2 (2 blocks
    of 32, the first with a 1x1 downsample), fc."""

    def __init__(self, num_classes=2):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2, down), BasicBlock(32, 32))
        self.fc = nn.Linear(32, num_classes)


CONVS = [
    "conv1",
    "layer1.0.conv1",
    "layer1.0.conv2",
    "layer1.1.conv1",
    "layer1.1.conv2",
    "layer2.0.conv1",
    "layer2.0.conv2",
    "layer2.0.downsample.0",
    "layer2.1.conv1",
    "layer2.1.conv2",
]

# Ranks of flat spectra (all signal singular values equal), source A vs B. Then d_h are all equal, so
# G_d = r / N_d exactly and the layer G = r/2 * (1/N_in + 1/N_out): r/16 in layer1, 3r/64 for a 16 -> 32
# conv, r/32 for 32 -> 32. Per-layer winners (kg-select) differ from the block winners, and the block
# winners from the stage winners:
#   layer1.0: mean r   A 3   B 3.5 -> B     layer1.1: A 3.5 B 2.5 -> A      stage layer1: A 13/64 B 12/64 -> A
#   layer2.0: mean G   A 0.1458 B 0.1667 -> B    layer2.1: A 0.1875 B 0.1719 -> A    stage layer2: A 0.1625
#   B 0.1688 -> B.  The stem is its own unit (A 1, B 2 -> B).
KG_RANKS = {
    "conv1": (1, 2),
    "layer1.0.conv1": (5, 3),
    "layer1.0.conv2": (1, 4),
    "layer1.1.conv1": (4, 1),
    "layer1.1.conv2": (3, 4),
    "layer2.0.conv1": (4, 2),
    "layer2.0.conv2": (2, 10),
    "layer2.0.downsample.0": (4, 2),
    "layer2.1.conv1": (6, 2),
    "layer2.1.conv2": (6, 9),
}
WINNERS = {  # rule -> per conv in CONVS order, 0 = A, 1 = B
    "kg-select": [1, 0, 1, 0, 1, 0, 1, 0, 0, 1],
    "block-select": [1, 1, 1, 0, 0, 1, 1, 1, 0, 0],
    "stage-select": [1, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    "kappa-select": [0, 1, 0, 1, 0, 1, 0, 1, 0, 0],
}

# Signal spectra for kappa-select: kappa ~ s_1 / s_r (noise 1e-4, so d ~ s). [] is pure noise: EVBMF keeps
# nothing, the logged kappa is 0, and selection counts it as inf (layer1.0.conv2: A wins with kappa 3).
# A single component has kappa 1, the best possible (layer1.1.conv1). Both pure noise: the first source.
KAPPA_SPECTRA = {
    "conv1": ([1, 2], [1, 4]),
    "layer1.0.conv1": (np.linspace(1, 8, 4), np.linspace(1, 2, 4)),
    "layer1.0.conv2": (np.linspace(1, 3, 3), []),
    "layer1.1.conv1": (np.linspace(1, 1.5, 4), [1]),
    "layer1.1.conv2": ([1, 1.2, 1.5], np.linspace(1, 6, 3)),
    "layer2.0.conv1": (np.linspace(1, 5, 4), np.linspace(1, 2.5, 4)),
    "layer2.0.conv2": (np.linspace(1, 2, 6), np.linspace(1, 4, 6)),
    "layer2.0.downsample.0": (np.linspace(1, 3, 3), np.linspace(1, 1.5, 3)),
    "layer2.1.conv1": (np.linspace(1, 2, 4), np.linspace(1, 2.5, 4)),
    "layer2.1.conv2": ([], []),
}


def spectrum_conv(shape, s, rng, noise=1e-4):
    """sum_h s_h a_h (x) b_h (x) c_h plus small noise: both unfoldings have singular values s (a_h, b_h
    orthonormal, c_h unit), so EVBMF keeps exactly len(s) components."""
    n_out, n_in, kh, kw = shape
    w = noise * rng.standard_normal((n_out, n_in, kh * kw))
    if len(s):
        a, _ = np.linalg.qr(rng.standard_normal((n_out, len(s))))
        b, _ = np.linalg.qr(rng.standard_normal((n_in, len(s))))
        c = rng.standard_normal((kh * kw, len(s)))
        c /= np.linalg.norm(c, axis=0)
        w += np.einsum("h,oh,ih,kh->oik", np.asarray(s, dtype=np.float64), a, b, c)
    return torch.from_numpy(w.reshape(shape)).float()


def tiny_state(spectra, seed, bn_value):
    """A TinyResNet state_dict with the given per-conv spectra and recognizable BN values."""
    rng = np.random.default_rng(seed)
    state = TinyResNet().state_dict()
    for conv, s in spectra.items():
        key = conv + ".weight"
        state[key] = spectrum_conv(tuple(state[key].shape), s, rng)
    for k in state:
        if state[k].is_floating_point() and state[k].ndim == 1:  # BN affine and statistics, fc bias
            state[k] = torch.full_like(state[k], bn_value)
    return state


def flat(design, i):
    return {conv: [1.0] * pair[i] for conv, pair in design.items()}


def spectra(design, i):
    return {conv: pair[i] for conv, pair in design.items()}


@pytest.fixture(scope="module")
def sources():
    """design -> the two source models A, B (their kg or kappa construction)."""
    kg = [tiny_state(flat(KG_RANKS, i), seed=i, bn_value=0.25 + 0.5 * i) for i in (0, 1)]
    kappa = [tiny_state(spectra(KAPPA_SPECTRA, i), seed=10 + i, bn_value=0.25 + 0.5 * i) for i in (0, 1)]
    wrap = lambda states: [SourceModel(f"run{'AB'[i]}", None, "tiny", s) for i, s in enumerate(states)]
    return {"kg": wrap(kg), "kappa": wrap(kappa)}


def chosen(sources, rule, design="kg"):
    groups = conv_groups(TinyResNet())
    assert [g.conv for g in groups] == CONVS
    merged, layers = _merge(sources[design], groups, rule)
    return merged, layers, groups


# ------------------------------------------------------------------------------------------- units


def test_merge_units_of_resnet_module_names():
    names = [g.conv for g in conv_groups(build_model("resnet18", 2))]
    assert {merge_unit(n, "block") for n in names} == {"conv1"} | {f"layer{s}.{b}" for s in range(1, 5) for b in (0, 1)}
    assert {merge_unit(n, "stage") for n in names} == {"conv1", "layer1", "layer2", "layer3", "layer4"}
    assert merge_unit("layer3.0.downsample.0", "block") == "layer3.0"
    assert merge_unit("layer3.0.downsample.0", "stage") == "layer3"
    assert merge_unit("layer12.3.conv2", "block") == "layer12.3" and merge_unit("layer4.1.conv2", "layer") == (
        "layer4.1.conv2"
    )
    assert merge_unit("features.denseblock1.denselayer1.conv1", "block") == "features.denseblock1.denselayer1.conv1"
    assert merge_unit("mylayer1.0.conv", "stage") == "mylayer1.0.conv"  # a prefix, not a substring


def test_selection_kappa_counts_an_empty_unfolding_as_worst():
    def lm(rank_in, rank_out, kappa):
        u = lambda mode, r: UnfoldingMetrics(mode, 8, r, r / 8, 0.1 * r, kappa if r else 0.0, 0.01)
        return LayerMetrics(0.1, kappa, u("in", rank_in), u("out", rank_out))

    assert selection_kappa(lm(3, 2, 1.5)) == 1.5
    assert selection_kappa(lm(0, 2, 0.75)) == math.inf
    assert selection_kappa(lm(2, 0, 0.75)) == math.inf
    assert selection_kappa(lm(0, 0, 0.0)) == math.inf


def test_rule_weights_of_the_new_rules():
    np.testing.assert_array_equal(rule_weights("kappa-select", [3.0, 1.5, 2.0]), [0, 1, 0])
    np.testing.assert_array_equal(rule_weights("kappa-select", [math.inf, 7.0]), [0, 1])
    np.testing.assert_array_equal(rule_weights("kappa-select", [math.inf, math.inf]), [1, 0])  # the first
    np.testing.assert_array_equal(rule_weights("kappa-select", [2.0, 2.0]), [1, 0])
    for rule in ("block-select", "stage-select"):
        np.testing.assert_array_equal(rule_weights(rule, [0.1, 0.3, 0.2]), [0, 1, 0])
        np.testing.assert_array_equal(rule_weights(rule, [0.2, 0.2]), [1, 0])


# ------------------------------------------------------------------------------------------- rules


def test_the_construction_gives_the_designed_gains(sources):
    """Flat spectra: G = r/2 (1/N_in + 1/N_out) per source and layer (EVBMF on the default search)."""
    for i, s in enumerate(sources["kg"]):
        for conv, ranks in KG_RANKS.items():
            w = s.state[conv + ".weight"]
            m = layer_metrics(w)
            assert (m.inp.rank, m.out.rank) == (ranks[i], ranks[i]), conv
            assert m.kg == pytest.approx(ranks[i] / 2 * (1 / w.shape[1] + 1 / w.shape[0]), rel=2e-3), conv


@pytest.mark.parametrize("rule", ["kg-select", "block-select", "stage-select"])
def test_gain_rules_take_whole_units_from_the_designed_source(sources, rule):
    merged, layers, groups = chosen(sources, rule)
    assert [r["chosen"] for r in layers] == WINNERS[rule]
    for g, rec in zip(groups, layers):
        src = sources["kg"][rec["chosen"]]
        assert rec["chosen_source"] == f"run{'AB'[rec['chosen']]}"
        assert rec["weights"] == [1.0 - rec["chosen"], float(rec["chosen"])]
        for k in g.keys:  # the conv and its BN (running statistics included), copied exactly
            assert torch.equal(merged[k], src.state[k]), k
    if rule == "kg-select":
        return
    level = rule.split("-")[0]
    by_unit = {}
    for rec in layers:
        assert rec["unit"] == merge_unit(rec["conv"], level)
        by_unit.setdefault(rec["unit"], []).append(rec)
    assert len(by_unit) == (5 if level == "block" else 3)  # with the stem
    for members in by_unit.values():  # one source per unit, by the unit's mean layer gain
        mean = np.mean([[s["kg"] for s in rec["sources"]] for rec in members], axis=0)
        for rec in members:
            np.testing.assert_allclose(rec["unit_kg"], mean, rtol=1e-12)
            assert rec["chosen"] == int(np.argmax(mean))


def test_kappa_select_takes_the_lowest_condition_and_an_empty_layer_loses(sources):
    merged, layers, groups = chosen(sources, "kappa-select", design="kappa")
    assert [r["chosen"] for r in layers] == WINNERS["kappa-select"]
    recs = dict(zip(CONVS, layers))
    empty = recs["layer1.0.conv2"]  # B keeps nothing: logged kappa 0, selection kappa inf (null)
    assert empty["sources"][1]["kappa"] == 0.0 and empty["sources"][1]["out"]["rank"] == 0
    assert empty["selection_kappa"][1] is None and empty["selection_kappa"][0] == pytest.approx(3.0, rel=1e-2)
    assert recs["layer2.1.conv2"]["selection_kappa"] == [None, None]
    assert recs["layer1.0.conv1"]["selection_kappa"] == pytest.approx([8.0, 2.0], rel=1e-2)
    assert recs["layer1.1.conv1"]["selection_kappa"] == pytest.approx([1.5, 1.0], rel=1e-2)
    for g, rec in zip(groups, layers):
        for k in g.keys:
            assert torch.equal(merged[k], sources["kappa"][rec["chosen"]].state[k]), k
    json.dumps(layers, allow_nan=False)  # strict JSON: no Infinity in the report


# ---------------------------------------------------------------------------------- through distill


@pytest.fixture
def tiny_runs(tmp_path, monkeypatch, sources):
    """The kg design as two run directories of a "tiny" arch that build_model resolves to TinyResNet."""
    monkeypatch.setattr(merge, "build_model", lambda arch, num_classes=2: TinyResNet(num_classes))
    runs = []
    for s in sources["kg"]:
        run = tmp_path / s.run
        run.mkdir()
        checkpoint.save_weights(run / "best.pt", {"model": s.state, "arch": "tiny", "epoch": 1, "valid_top1": 0.5})
        runs.append(run)
    return runs


@pytest.mark.parametrize("rule, search", [("block-select", "reference"), ("stage-select", "grid")])
def test_distill_records_the_new_rules_lowrank_and_search(tiny_runs, tmp_path, rule, search):
    out = tmp_path / "m.pt"
    summary = distill(DistillConfig(sources=tiny_runs, rule=rule, out=out, lowrank=True, evbmf_search=search))
    report = json.loads(out.with_suffix(".json").read_text())
    ckpt = checkpoint.load(out)
    assert summary["evbmf_search"] == report["evbmf_search"] == ckpt["distill"]["evbmf_search"] == search
    assert report["rule"] == ckpt["distill"]["rule"] == rule and report["lowrank"] is True
    assert [r["chosen"] for r in report["layers"]] == WINNERS[rule]
    want = {str(run): WINNERS[rule].count(i) for i, run in enumerate(tiny_runs)}
    assert report["picks"] == summary["picks"] == want
    for conv, rec in zip(CONVS, report["layers"]):  # low rank: the chosen source's designed rank
        assert rec["unit"] == merge_unit(conv, rule.split("-")[0])
        assert rec["lowrank"]["rank"] == KG_RANKS[conv][rec["chosen"]] and rec["lowrank"]["replaced"]


def test_distill_threads_the_search_into_the_metrics(tiny_runs, tmp_path):
    """Weights ~1e-3 of pure noise: sigma2 ~ 1e-6 is below the reference's absolute tolerance (1e-5),
    so the reference keeps noise components; the grid search keeps none."""
    noise = torch.from_numpy(1e-3 * np.random.default_rng(5).standard_normal((16, 16, 3, 3))).float()
    for run in tiny_runs:
        ckpt = checkpoint.load(run / "best.pt")
        ckpt["model"]["layer1.1.conv1.weight"] = noise
        checkpoint.save_weights(run / "best.pt", ckpt)
    ranks = {}
    for search in ("grid", "reference"):
        out = tmp_path / f"{search}.pt"
        distill(DistillConfig(sources=tiny_runs, rule="kg-select", out=out, lowrank=True, evbmf_search=search))
        rec = {r["conv"]: r for r in json.loads(out.with_suffix(".json").read_text())["layers"]}["layer1.1.conv1"]
        ranks[search] = rec["sources"][0]["out"]["rank"]
        assert rec["sources"][0] == layer_metrics(noise, search=search).to_dict()
        assert rec["lowrank"]["rank"] == ranks[search] and rec["lowrank"]["replaced"] == (search == "reference")
    assert ranks["grid"] == 0 < ranks["reference"]


def test_unknown_search_is_a_user_error(tiny_runs, tmp_path):
    with pytest.raises(UserError, match="evbmf-search"):
        distill(DistillConfig(sources=tiny_runs, rule="average", out=tmp_path / "x.pt", evbmf_search="golden"))
