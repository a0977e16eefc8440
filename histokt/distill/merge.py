"""`histokt distill`: merge N Stage-A models of one architecture into one, without training (docs/method.md §4).

HistoKT's merge script is lost; docs/method.md §4.2 gives the most plausible procedure (a HYPOTHESIS) and §4.3
the alternatives to keep pluggable. Rules, per conv layer (a ``Conv2d`` with its BatchNorm: the module
that directly follows it in module order, when it is a BatchNorm over the conv's output channels); a
"source model" is one of the models being merged (``--sources``), not a raw image as in ingest:

* ``kg-select``   -- the conv (and its BN, running statistics included) of the source model with the
  highest layer knowledge gain G = (G_in + G_out)/2 (ties: the first source model);
* ``average``     -- element-wise mean ("model soup");
* ``kg-weighted`` -- mean weighted by G, normalized per layer to sum 1 (all gains zero: uniform);
* ``block-select`` / ``stage-select`` -- per unit, every conv (with its BN) of the source model whose
  mean layer G over the unit's convs is highest (ties: the first). Units come from the module names of
  torchvision's ResNets: a block is the path prefix ``layerN.M`` (a BasicBlock or Bottleneck, its
  downsample included), a stage the prefix ``layerN``; a conv outside them (the stem ``conv1``, or any
  conv of an architecture without such names) is its own unit;
* ``kappa-select`` -- per conv layer, the source model with the lowest mapping condition
  kappa = (kappa_in + kappa_out)/2 (ties: the first). An unfolding where EVBMF retains nothing (or
  fails) has no kappa; method.md §4.4 logs 0 there, which would rank it best, so for selection such a
  layer counts as worst (kappa = inf, written as null in MERGED.json).

Everything not attached to a conv (the head, stray parameters) is averaged; integer buffers
(``num_batches_tracked``) take the maximum unless selected. Source models of different datasets have heads
of different sizes: the head is irrelevant (Stage B replaces it), so then the first source model's is kept.
``--lowrank`` ("postSVD") replaces each merged conv weight by the EVBMF reconstruction of its output-channel
unfolding; a layer where EVBMF retains nothing keeps its merged weight (a zero conv would cut the network).
``--evbmf-search`` picks EVBMF's noise-variance search for the metrics and the low-rank step (histokt.distill.evbmf:
"grid", the default, or "reference", the reference's bounded search that can stop in a wrong local minimum).

Outputs: MERGED.pt = {"model": state_dict, "arch", "distill": {...}} (weights-only loadable, a valid
``histokt train --init``) and MERGED.json with, per conv layer, every source model's metrics and the choice.
"""

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from histokt import __version__, atomic
from histokt.distill.evbmf import DEFAULT_SEARCH, SEARCHES, LayerMetrics, layer_metrics, low_rank
from histokt.errors import UserError
from histokt.train import checkpoint
from histokt.train.models import build_model, head_name

RULES = ("kg-select", "average", "kg-weighted", "block-select", "stage-select", "kappa-select")
SELECT_RULES = ("kg-select", "block-select", "stage-select", "kappa-select")  # one source per layer
UNIT_LEVELS = {"block-select": "block", "stage-select": "stage"}  # rules that select whole units
_UNIT_PATTERNS = {"block": re.compile(r"^(layer\d+\.\d+)\."), "stage": re.compile(r"^(layer\d+)\.")}
BEST = "best.pt"


@dataclass
class DistillConfig:
    """One merge: which Stage-A runs, how, and where the merged checkpoint goes."""

    sources: list[Path] = field(
        metadata={
            "nargs": "+",
            "metavar": "RUN_DIR",
            "help": "Stage-A run directories (each holding best.pt) of one architecture",
        }
    )
    rule: str = field(
        metadata={
            "choices": RULES,
            "help": "kg-select: per conv layer the source with the highest knowledge "
            "gain; average: element-wise mean; kg-weighted: mean weighted by gain; block-select / "
            "stage-select: per ResNet block (layerN.M) / stage (layerN) the source with the highest mean "
            "gain; kappa-select: per conv layer the source with the lowest mapping condition",
        }
    )
    out: Path = field(metadata={"metavar": "MERGED.pt", "help": "merged checkpoint (MERGED.json is written beside it)"})
    lowrank: bool = field(
        default=False, metadata={"help": "replace each merged conv by its EVBMF low-rank reconstruction (postSVD)"}
    )
    evbmf_search: str = field(
        default=DEFAULT_SEARCH,
        metadata={
            "choices": SEARCHES,
            "help": "EVBMF noise-variance search: grid (log-spaced scan, then Brent around the best point) "
            "or reference (the reference's bounded Brent search, which can stop in a wrong local minimum)",
        },
    )


@dataclass
class SourceModel:
    """A model being merged: a Stage-A run's best.pt (not a raw image, which ingest calls a source)."""

    run: Path
    path: Path
    arch: str
    state: dict


@dataclass
class ConvGroup:
    """A conv layer and the state-dict keys that move with it (its own and its BatchNorm's)."""

    conv: str
    bn: Optional[str]
    keys: list


# --------------------------------------------------------------------------------------------- public


def distill(cfg: DistillConfig) -> dict:
    """Merge the source models by ``cfg.rule``; write MERGED.pt and MERGED.json; return a summary."""
    start = time.monotonic()
    out, report_path = _check_config(cfg)
    source_models = [_load_model(Path(p)) for p in cfg.sources]
    arch = _common_arch(source_models)
    model = build_model(arch, num_classes=2)  # structure only: module order and the head's name
    head = head_name(model) + "."
    _check_compatible(source_models, model, head)
    groups = conv_groups(model)
    merged, layers = _merge(source_models, groups, cfg.rule, cfg.evbmf_search)
    other = _merge_rest(source_models, merged, head)
    if cfg.lowrank:
        _apply_lowrank(merged, groups, layers, cfg.evbmf_search)
    merged = {k: merged[k] for k in source_models[0].state}  # the source models' key order
    report = _report(cfg, arch, source_models, layers, other, time.monotonic() - start)
    meta = {
        "rule": cfg.rule,
        "lowrank": cfg.lowrank,
        "evbmf_search": cfg.evbmf_search,
        "sources": [str(s.run) for s in source_models],
    }
    checkpoint.save_weights(out, {"model": merged, "arch": arch, "distill": meta})
    atomic.write_json(report_path, report)
    return {
        "out": str(out),
        "json": str(report_path),
        "arch": arch,
        "rule": cfg.rule,
        "lowrank": cfg.lowrank,
        "evbmf_search": cfg.evbmf_search,
        "sources": len(source_models),
        "layers": len(layers),
        "picks": report["picks"],
        "seconds": report["seconds"],
    }


def conv_groups(model: nn.Module) -> list[ConvGroup]:
    """Every Conv2d in module order, with the BatchNorm that directly follows it (if any).

    "Directly follows": the next module that holds parameters or buffers itself (ReLUs and containers
    skipped) is a BatchNorm over the conv's output channels, as bn1 after conv1 in a ResNet block.
    """
    leaves = [(n, m) for n, m in model.named_modules() if _has_own_state(m)]
    keys = list(model.state_dict())
    groups = []
    for i, (name, module) in enumerate(leaves):
        if not isinstance(module, nn.Conv2d):
            continue
        bn = None
        if i + 1 < len(leaves):
            nxt_name, nxt = leaves[i + 1]
            if isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.num_features == module.out_channels:
                bn = nxt_name
        owned = {name} | ({bn} if bn else set())
        groups.append(ConvGroup(name, bn, [k for k in keys if k.rsplit(".", 1)[0] in owned]))
    return groups


def merge_unit(conv: str, level: str) -> str:
    """The unit a conv is selected with: ``"layer"`` itself, ``"block"`` its ``layerN.M``, ``"stage"`` its
    ``layerN`` (torchvision ResNet names); a conv outside such a prefix (the stem) is its own unit."""
    if level == "layer":
        return conv
    match = _UNIT_PATTERNS[level].match(conv)
    return match.group(1) if match else conv


def selection_kappa(m: LayerMetrics) -> float:
    """A layer's kappa for kappa-select: the mean of both unfoldings', inf where one retains nothing."""
    return m.kappa if m.inp.rank > 0 and m.out.rank > 0 else math.inf


def rule_scores(rule: str, groups: list[ConvGroup], metrics: list[list[LayerMetrics]]) -> list[np.ndarray]:
    """Per conv group, the per-source values ``rule_weights`` turns into weights: the layer gains, the
    mean gain over the group's unit (block-/stage-select), or the selection kappas (kappa-select)."""
    if rule == "kappa-select":
        return [np.array([selection_kappa(m) for m in ms]) for ms in metrics]
    gains = [np.array([m.kg for m in ms]) for ms in metrics]
    if rule not in UNIT_LEVELS:
        return gains
    units = [merge_unit(g.conv, UNIT_LEVELS[rule]) for g in groups]
    members: dict[str, list] = {}
    for unit, g in zip(units, gains):
        members.setdefault(unit, []).append(g)
    mean = {unit: np.mean(gs, axis=0) for unit, gs in members.items()}
    return [mean[unit] for unit in units]


def rule_weights(rule: str, gains) -> np.ndarray:
    """Per-source weights of one layer: one-hot argmax (argmin of kappas for kappa-select), uniform, or
    gains normalized to sum 1. ``gains`` are the layer's ``rule_scores``."""
    g = np.asarray(gains, dtype=np.float64)
    n = g.size
    if rule in SELECT_RULES:
        w = np.zeros(n)
        w[int(np.argmin(g) if rule == "kappa-select" else np.argmax(g))] = 1.0
        return w
    if rule == "kg-weighted" and g.sum() > 0:
        return g / g.sum()
    if rule in ("average", "kg-weighted"):
        return np.full(n, 1.0 / n)
    raise UserError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")


# ------------------------------------------------------------------------------------------ inputs


def _check_config(cfg: DistillConfig) -> tuple[Path, Path]:
    if len(cfg.sources) < 2:
        raise UserError(f"--sources: at least 2 run directories are needed to merge, got {len(cfg.sources)}")
    if cfg.rule not in RULES:
        raise UserError(f"--rule {cfg.rule!r}: unknown rule; choose one of {', '.join(RULES)}")
    if cfg.evbmf_search not in SEARCHES:
        raise UserError(f"--evbmf-search {cfg.evbmf_search!r}: unknown search; choose one of {', '.join(SEARCHES)}")
    out = Path(cfg.out)
    if out.suffix == ".json":
        raise UserError(f"--out {out}: the checkpoint path must not end in .json (the report goes there)")
    return out, out.with_suffix(".json")


def _load_model(run: Path) -> SourceModel:
    """A RUN_DIR's best.pt (a checkpoint file itself is accepted too), weights-only."""
    path = run if run.is_file() else run / BEST
    if not path.is_file():
        raise UserError(f"{run}: no {BEST} (is it a finished Stage-A run directory?)")
    try:
        ckpt = checkpoint.load(path)
    except Exception as exc:  # any unpickling failure means a damaged or foreign file
        raise UserError(
            f"{path}: unreadable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        ) from None
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a histokt checkpoint (no 'model' state_dict)")
    if not isinstance(ckpt.get("arch"), str):
        raise UserError(f"{path}: the checkpoint does not record its 'arch'")
    return SourceModel(run, path, ckpt["arch"], state)


def _common_arch(source_models: list[SourceModel]) -> str:
    first = source_models[0]
    for s in source_models[1:]:
        if s.arch != first.arch:
            raise UserError(f"different architectures: {first.path} is {first.arch}, {s.path} is {s.arch}")
    return first.arch


def _check_compatible(source_models: list[SourceModel], model: nn.Module, head: str) -> None:
    """Same keys everywhere (and those of the arch); same shapes except the head's (class counts differ)."""
    expected = {k for k in model.state_dict() if not k.startswith(head)}
    for s in source_models:
        keys = {k for k in s.state if not k.startswith(head)}
        missing, unexpected = sorted(expected - keys), sorted(keys - expected)
        if missing:
            raise UserError(f"{s.path}: key {missing[0]} missing (not a {s.arch} state_dict?)")
        if unexpected:
            raise UserError(f"{s.path}: unexpected key {unexpected[0]} for {s.arch}")
    ref = source_models[0]
    for s in source_models[1:]:
        only = sorted(set(ref.state) ^ set(s.state))
        if only:
            raise UserError(f"key {only[0]} is in only one of {ref.path} and {s.path}")
        for k, v in ref.state.items():
            if not k.startswith(head) and s.state[k].shape != v.shape:
                raise UserError(
                    f"key {k}: shape {tuple(v.shape)} in {ref.path} but {tuple(s.state[k].shape)} in {s.path}"
                )


def _has_own_state(module: nn.Module) -> bool:
    return (
        next(module.parameters(recurse=False), None) is not None
        or next(module.buffers(recurse=False), None) is not None
    )


# ------------------------------------------------------------------------------------------ merging


def _combine(tensors: list, weights: np.ndarray) -> torch.Tensor:
    """Weighted sum in float64 (cast back); a one-hot weight copies exactly; integers take the max."""
    hot = np.flatnonzero(weights == 1.0)
    if hot.size == 1:
        return tensors[int(hot[0])].clone()
    if not tensors[0].is_floating_point():
        return torch.stack(tensors).amax(dim=0)
    acc = sum(float(w) * t.double() for w, t in zip(weights, tensors))
    return acc.to(tensors[0].dtype)


def _merge(
    source_models: list[SourceModel], groups: list[ConvGroup], rule: str, search: str = DEFAULT_SEARCH
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Merge every conv group by the rule; per layer, the record that goes into MERGED.json."""
    metrics = [[layer_metrics(s.state[g.conv + ".weight"], search=search) for s in source_models] for g in groups]
    merged, layers = {}, []
    for g, ms, scores in zip(groups, metrics, rule_scores(rule, groups, metrics)):
        weights = rule_weights(rule, scores)
        for k in g.keys:
            merged[k] = _combine([s.state[k] for s in source_models], weights)
        record = {
            "conv": g.conv,
            "bn": g.bn,
            "shape": list(source_models[0].state[g.conv + ".weight"].shape),
            "weights": weights.tolist(),
            "sources": [m.to_dict() for m in ms],
        }
        if rule in UNIT_LEVELS:
            record["unit"] = merge_unit(g.conv, UNIT_LEVELS[rule])
            record["unit_kg"] = scores.tolist()
        if rule == "kappa-select":
            record["selection_kappa"] = [v if math.isfinite(v) else None for v in scores.tolist()]
        if rule in SELECT_RULES:
            record["chosen"] = int(np.argmax(weights))
            record["chosen_source"] = str(source_models[record["chosen"]].run)
        layers.append(record)
    return merged, layers


def _merge_rest(source_models: list[SourceModel], merged: dict, head: str) -> dict:
    """Keys outside conv groups: uniform average (integers: max); a head of differing shapes: the first's."""
    rest = [k for k in source_models[0].state if k not in merged]
    uniform = np.full(len(source_models), 1.0 / len(source_models))
    head_note = "averaged"
    for k in rest:
        tensors = [s.state[k] for s in source_models]
        if any(t.shape != tensors[0].shape for t in tensors):  # only the head can differ (checked)
            merged[k] = tensors[0].clone()
            head_note = f"kept from {source_models[0].run} (class counts differ)"
        else:
            merged[k] = _combine(tensors, uniform)
    return {"averaged": [k for k in rest if not k.startswith(head)], "head": head_note}


def _apply_lowrank(merged: dict, groups: list[ConvGroup], layers: list, search: str = DEFAULT_SEARCH) -> None:
    """postSVD: each merged conv weight -> EVBMF reconstruction of its output-channel unfolding."""
    for g, record in zip(groups, layers):
        key = g.conv + ".weight"
        w = merged[key]
        rebuilt, r = low_rank(w, "out", search=search)
        kept = r.rank > 0
        if kept:
            merged[key] = torch.from_numpy(rebuilt).to(w.dtype)
        record["lowrank"] = {"rank": r.rank, "channels": int(w.shape[0]), "sigma2": r.sigma2, "replaced": kept}


def _report(
    cfg: DistillConfig,
    arch: str,
    source_models: list[SourceModel],
    layers: list[dict[str, Any]],
    other: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    picks = {}
    if cfg.rule in SELECT_RULES:
        picks = {str(s.run): sum(1 for r in layers if r["chosen"] == i) for i, s in enumerate(source_models)}
    return {
        "format": "histokt-distill/1",
        "histokt_version": __version__,
        "rule": cfg.rule,
        "lowrank": cfg.lowrank,
        "arch": arch,
        "sources": [str(s.run) for s in source_models],
        "checkpoints": [str(s.path) for s in source_models],
        "out": str(cfg.out),
        "metric": "EVBMF, p=1",
        "evbmf_search": cfg.evbmf_search,
        "picks": picks,
        "layers": layers,
        "other": other,
        "seconds": round(seconds, 3),
    }
