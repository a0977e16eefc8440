"""Networks: any torchvision classification model, its head sized to the task, three ways to initialise it.

``build_model(arch, num_classes, init)`` with ``init`` one of

* ``"random"``   -- torchvision's own initialisation (for ResNet18: Kaiming-normal fan_out convs, BN 1/0);
* ``"imagenet"`` -- torchvision's ImageNet file, read from the torch.hub cache only (nothing is ever
  downloaded: compute nodes usually have no internet, so the file is staged beforehand);
* a PATH        -- a Stage-A checkpoint (``{"model": state_dict, ...}``) or a plain state_dict (e.g. a
  merged model); the encoder must match ``arch`` exactly.

In every case the classification head is a fresh ``nn.Linear(in_features, num_classes)`` with PyTorch's
default initialisation; whatever head the weights file carried (1000 ImageNet classes, the source
dataset's classes) is dropped. Files are always read with ``torch.load(..., weights_only=True)``.

Fine-tuning (docs/method.md §3): ``freeze_encoder`` leaves only the head trainable. With ``bn="train"`` (the
paper's behaviour) the network stays in train mode, so the frozen encoder's BatchNorm running statistics
still update; with ``bn="eval"`` the training loop calls ``apply_bn_mode(model)`` after every
``model.train()`` to keep the encoder's BatchNorm layers in eval mode.
"""

import difflib
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from histokt.atomic import atomic_path
from histokt.errors import UserError

INITS = ("random", "imagenet")
BN_MODES = ("train", "eval")

# Models with auxiliary classifiers: histokt builds them without (the training loop expects one output
# tensor); the aux weights that torchvision's ImageNet files carry are dropped on load.
_AUX_ARCHS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}
# Checkpoint key prefixes added by wrappers (DataParallel/DDP, torch.compile), stripped when on every key.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_BN_MODE_ATTR = "_histokt_bn_mode"


# --------------------------------------------------------------------------------------------- names


def classification_archs() -> list[str]:
    """Every torchvision classification model name (sorted)."""
    return sorted(list_models(module=torchvision.models))


def _check_arch(arch: str) -> str:
    valid = classification_archs()
    if arch in valid:
        return arch
    near = difflib.get_close_matches(str(arch), valid, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    examples = "resnet18, resnet50, densenet121, mobilenet_v3_small, efficientnet_b0, vit_b_16"
    what = "not a torchvision classification model" if arch in list_models() else "unknown architecture"
    raise UserError(
        f"{what} {arch!r}; {hint}valid names include {examples} "
        f"({len(valid)} in all: torchvision.models.list_models(module=torchvision.models))"
    )


def _builder_kwargs(arch: str, with_aux: bool = False) -> dict:
    if arch in _AUX_ARCHS:
        # with_aux: the layout of torchvision's ImageNet file, built as torchvision builds it (init_weights
        # False); histokt's own model has no aux heads and torchvision's init (explicit: no FutureWarning)
        return {"aux_logits": with_aux, "init_weights": not with_aux}
    return {}


def _construct(arch: str, with_aux: bool = False) -> nn.Module:
    """torchvision's model, weights=None always (nothing downloads), its default 1000-class head."""
    return get_model(arch, weights=None, **_builder_kwargs(arch, with_aux))


# ---------------------------------------------------------------------------------------------- head


def _locate_head(model: nn.Module) -> tuple[nn.Module, str, str]:
    """(parent module, attribute, dotted name) of the final classification Linear, or UserError."""
    candidates = []
    if isinstance(
        getattr(model, "fc", None), nn.Linear
    ):  # resnet/resnext/wide_resnet, regnet, shufflenet, googlenet, inception
        candidates.append((model, "fc", "fc"))
    heads = getattr(model, "heads", None)
    if isinstance(heads, nn.Module) and isinstance(getattr(heads, "head", None), nn.Linear):  # vit
        candidates.append((heads, "head", "heads.head"))
    if isinstance(getattr(model, "head", None), nn.Linear):  # swin
        candidates.append((model, "head", "head"))
    clf = getattr(model, "classifier", None)
    if isinstance(clf, nn.Linear):  # densenet
        candidates.append((model, "classifier", "classifier"))
    elif (
        isinstance(clf, nn.Sequential) and len(clf) and isinstance(clf[-1], nn.Linear)
    ):  # vgg, alexnet, mobilenet, efficientnet, convnext, mnasnet, maxvit
        last = list(clf._modules)[-1]
        candidates.append((clf, last, f"classifier.{last}"))
    if not candidates:
        name = type(model).__name__
        raise UserError(
            f"{name}: unsupported model, no Linear classification head found at fc, classifier[-1], "
            f"heads.head or head (e.g. squeezenet ends in a Conv2d)"
        )
    return candidates[0]


def head_name(model: nn.Module) -> str:
    """Dotted module name of the classification head (``fc`` for ResNet18)."""
    return _locate_head(model)[2]


def head_names(model: nn.Module) -> set[str]:
    """Parameter names of the classification head, e.g. ``{"fc.weight", "fc.bias"}``."""
    _, _, name = _locate_head(model)
    return {n for n, _ in model.named_parameters() if n.startswith(name + ".")}


def _replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    parent, attr, _ = _locate_head(model)
    old = getattr(parent, attr)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)  # PyTorch default init
    setattr(parent, attr, new.to(device=old.weight.device, dtype=old.weight.dtype))
    return model


# ----------------------------------------------------------------------------------------- ImageNet


def imagenet_weights(arch: str):
    """The torchvision weights enum member histokt means by "ImageNet": the arch's DEFAULT (IMAGENET1K_*)."""
    return get_model_weights(_check_arch(arch)).DEFAULT


def imagenet_cache_path(arch: str) -> Path:
    """Where torchvision caches the arch's ImageNet file: ``<torch.hub.get_dir()>/checkpoints/<basename>``.

    ``torch.hub.get_dir()`` is ``$TORCH_HOME/hub``, else ``$XDG_CACHE_HOME/torch/hub``, else
    ``~/.cache/torch/hub`` (read at call time). For resnet18 the file is ``resnet18-f37072fd.pth``.
    """
    url = imagenet_weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _staging_hint(arch: str, path: Path) -> str:
    url = imagenet_weights(arch).url
    return (
        f"compute nodes usually have no internet: on a login node run "
        f"'curl -L --create-dirs -o {path} {url}', or set TORCH_HOME to a directory holding "
        f"hub/checkpoints/{path.name}"
    )


def stand_in_imagenet(path, arch: str = "resnet18", seed: int = 0) -> Path:
    """Write a generated stand-in for the arch's ImageNet file: the real file's keys and shapes, random values.

    Seeded (the global RNG is left untouched); BatchNorm running statistics are randomised too, so a test
    can tell loaded buffers from fresh ones. For tests and demos: no ImageNet knowledge is in it.
    """
    arch = _check_arch(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _construct(arch, with_aux=True)  # the layout of torchvision's file (aux heads included)
        sd = model.state_dict()
        for key, value in sd.items():
            if key.endswith("running_mean"):
                value.copy_(torch.randn_like(value) * 0.1)
            elif key.endswith("running_var"):
                value.copy_(torch.rand_like(value) + 0.5)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(sd, tmp)
    return path


# --------------------------------------------------------------------------------------------- files


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_file(path: Path, what: str, hint: str = ""):
    """``torch.load(path, map_location="cpu", weights_only=True)``; every failure is a one-line UserError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if m:
            raise UserError(
                f"{what} {path}: refused, it pickles a non-tensor object ({m.group(1)}); histokt loads "
                f"weights only (torch.load weights_only=True): save a plain state_dict or {{'model': state_dict}}"
            ) from None
        raise UserError(f"{what} {path}: not a readable PyTorch weights file ({_first_line(exc)}){hint}") from None
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot read ({exc.strerror or _first_line(exc)})") from None
    except Exception as exc:  # truncated zip, empty file, legacy garbage: all mean "corrupt"
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
        raise UserError(f"{what} {path}: corrupt or not a PyTorch weights file ({reason}){hint}") from None


def _state_dict_of(obj, path: Path, what: str) -> dict:
    """The state_dict inside a loaded file: ``obj["model"]`` for histokt checkpoints, else ``obj`` itself."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"{what} {path}: holds neither a state_dict nor a checkpoint dict with key 'model'")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise UserError(
            f"{what} {path}: not a state_dict (non-tensor entries: {_few(bad)}); expected a plain "
            f"state_dict or a checkpoint dict with key 'model'"
        )
    sd = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _few(items, n: int = 3) -> str:
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _load_encoder(model: nn.Module, arch: str, sd: dict, path: Path, what: str) -> None:
    """Copy every non-head weight from ``sd`` into ``model``; the keys and shapes must match exactly.

    The file's head (any size) is ignored; so are torchvision's auxiliary classifiers for googlenet /
    inception_v3. BatchNorm ``num_batches_tracked`` counters may be absent (older files lack them).
    """
    head = head_name(model) + "."
    drop = (head,) + _AUX_ARCHS.get(arch, ())
    src = {k: v for k, v in sd.items() if not k.startswith(drop)}
    target = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    missing = [k for k in target if k not in src and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in src if k not in target]
    mismatched = [
        f"{k} {tuple(src[k].shape)} vs {tuple(target[k].shape)}"
        for k in src
        if k in target and src[k].shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches {_few(mismatched)}")
        raise UserError(
            f"{what} {path}: does not fit {arch}: {'; '.join(parts)}; checkpoint from a different architecture?"
        )
    with torch.no_grad():
        model.load_state_dict(src, strict=False)


# --------------------------------------------------------------------------------------------- build


def build_model(arch: str = "resnet18", num_classes: int = 2, init="random") -> nn.Module:
    """A torchvision classification model with a fresh ``num_classes`` head; see the module docstring.

    ``init``: ``"random"``, ``"imagenet"`` (from ``imagenet_cache_path(arch)``) or a path to a state_dict /
    ``{"model": state_dict}`` checkpoint of the same arch (the keywords win over a file of that name).
    """
    arch = _check_arch(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    model = _construct(arch)
    _locate_head(model)  # unsupported head -> UserError before any file is read

    if isinstance(init, str) and init == "imagenet":
        path = imagenet_cache_path(arch)
        if not path.is_file():
            raise UserError(f"ImageNet weights for {arch} not found at {path}; {_staging_hint(arch, path)}")
        hint = f"; re-stage it: {_staging_hint(arch, path)}"
        sd = _state_dict_of(_load_file(path, f"ImageNet weights for {arch}", hint), path, "ImageNet weights")
        _load_encoder(model, arch, sd, path, f"ImageNet weights for {arch}")
    elif isinstance(init, (str, os.PathLike)) and str(init) != "random":
        path = Path(init).expanduser()
        if not path.is_file():
            choices = ", ".join(INITS)
            raise UserError(f"init {str(init)!r}: no such checkpoint file (init is {choices} or a file path)")
        sd = _state_dict_of(_load_file(path, "checkpoint"), path, "checkpoint")
        _load_encoder(model, arch, sd, path, "checkpoint")
    elif init != "random":
        raise UserError(f"init must be one of {', '.join(INITS)} or a checkpoint path, got {init!r}")

    return _replace_head(model, num_classes)


# ---------------------------------------------------------------------------------------- fine-tuning


def _check_bn(bn) -> str:
    if bn not in BN_MODES:
        raise UserError(f"bn mode must be one of {', '.join(BN_MODES)}, got {bn!r}")
    return bn


def freeze_encoder(model: nn.Module, bn: str = "train") -> nn.Module:
    """Fine-tuning: only the head trains (requires_grad False on every other parameter).

    ``bn="train"``: the paper's behaviour, BN running stats of the frozen encoder still update in train mode.
    ``bn="eval"``: the encoder's BN layers are kept in eval mode; the mode is remembered on the model and the
    training loop must call ``apply_bn_mode(model)`` after every ``model.train()``.
    Optimizers skip parameters without gradients, so passing ``model.parameters()`` is safe.
    """
    bn = _check_bn(bn)
    head = head_names(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name in head)
    setattr(model, _BN_MODE_ATTR, bn)
    apply_bn_mode(model, bn)
    return model


def apply_bn_mode(model: nn.Module, bn: str | None = None) -> nn.Module:
    """Put the encoder's BatchNorm layers in the requested mode; call after every ``model.train()``.

    ``bn=None`` uses the mode given to ``freeze_encoder`` ("train" when it was never called). "eval" sets
    every encoder BatchNorm to eval (running stats frozen, batch stats unused); "train" makes them follow
    ``model.training``. Harmless on a model in eval mode.
    """
    bn = _check_bn(getattr(model, _BN_MODE_ATTR, "train") if bn is None else bn)
    head = head_name(model) + "."
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not (name + ".").startswith(head):
            module.train(model.training and bn == "train")
    return model
