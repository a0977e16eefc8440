"""The configuration of one training cell, importable without torch (planning thousands of cells stays light)."""

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from histokt import protocol
from histokt.errors import UserError
from histokt.protocol import DEFAULT as PROTOCOL_DEFAULT
from histokt.protocol import PROTOCOLS

# Options that change how a run executes, not what it computes: they may differ on a resume.
OPERATIONAL = (
    "workers",
    "progress",
    "ckpt_every_steps",
    "ckpt_every_min",
    "nproc",
    "device",
    "keep",
    "data_on",
    "device_budget",
)

# Options added after cells were first run: the value an older config.json means by leaving them out, so
# such a cell resumes (histokt.train.rundir.prepare_run_dir).
ADDED = {"protocol": "histokt", "valid_transform": "clean"}

# --keep: the weights a done cell keeps (best.pt, final.pt); the training state (last.pt, previous.pt) never stays
KEEP_DEFAULT = "best,final"
KEEP_CHOICES = ("best", "final")
KEEP_NONE = "none"


@dataclass
class TrainConfig:
    """Every knob of one training cell; serialized to RUN_DIR/config.json and into result.json."""

    store: Path = field(metadata={"help": "the patch store (histokt standardize)"})
    dataset: str = field(metadata={"help": "dataset name in the store to train on (the target)"})
    out: Path = field(metadata={"help": "run directory of this cell (created; resumed if it holds a checkpoint)"})
    init: str = field(
        default="random", metadata={"help": "random, imagenet (staged torchvision cache file) or PATH of a checkpoint"}
    )
    mode: str = field(
        default="scratch",
        metadata={
            "choices": ("scratch", "fine", "deep"),
            "help": "scratch: train all layers (Stage A); fine: train only the new head; deep: all layers",
        },
    )
    arch: str = field(default="resnet18", metadata={"help": "any torchvision classification model (default resnet18)"})
    epochs: int = field(default=250, metadata={"help": "epochs (paper: 250)"})
    batch_size: int = field(default=64, metadata={"help": "GLOBAL batch size, whatever the world size (paper: 64)"})
    lr: Optional[float] = field(
        default=None, metadata={"help": "learning rate (default: the recipe's for mode/target)"}
    )
    optimizer: Optional[str] = field(
        default=None,
        metadata={
            "help": "adas, adamp, sgd, adam, adamw (default: fine/deep adamp; scratch sgd with the histokt "
            "protocol, adas with the paper's)"
        },
    )
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay (paper: 5e-4)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (paper: 0.9)"})
    scheduler: str = field(default="step", metadata={"help": "step or none"})
    step_size: Optional[int] = field(
        default=None, metadata={"help": "epochs per LR step (default: 25 for scratch, 20 for fine/deep)"}
    )
    gamma: float = field(default=0.5, metadata={"help": "LR factor per step (paper: 0.5)"})
    seed: int = field(default=0, metadata={"help": "seed of init, data order and augmentation"})
    norm: str = field(
        default="dataset",
        metadata={
            "help": "normalization: dataset (this one's train statistics), imagenet, none, or another "
            "dataset's name in the store (HistoKT: the source's for random-init transfer)"
        },
    )
    bn: str = field(
        default="train",
        metadata={
            "choices": ("train", "eval"),
            "help": "fine mode: encoder BatchNorm statistics keep updating (train, the paper) or frozen (eval)",
        },
    )
    protocol: str = field(
        default=PROTOCOL_DEFAULT,
        metadata={
            "choices": PROTOCOLS,
            "help": "histokt (leakage-safe, recommended) or paper (as Zhang et al. trained): the defaults of "
            "--optimizer (scratch: sgd / adas), --precision (auto / fp32) and --valid-transform (clean / train, "
            "ADP clean); result.json lists every option that differs from the paper's",
        },
    )
    valid_transform: str = field(
        default="auto",
        metadata={
            "choices": ("auto", "clean", "train"),
            "help": "validation images, on which the best checkpoint is chosen: clean, or under the training "
            "augmentation (train: the original, for every dataset but ADP); auto: the protocol's",
        },
    )
    crop: int = field(default=0, metadata={"help": "random crop size after augmentation (0: full patch, the paper)"})
    augment: bool = field(default=True, metadata={"help": "flips + affine (--no-augment to turn off)"})
    augment_on: str = field(
        default="auto",
        metadata={
            "choices": ("auto", "loader", "device"),
            "help": "where the affine warp runs: loader workers (Pillow), or batched on the device; auto: the "
            "device on CUDA (the CPU loader cannot keep a GPU busy), the loader otherwise",
        },
    )
    data_on: str = field(
        default="auto",
        metadata={
            "choices": ("auto", "device", "loader"),
            "help": "where training and evaluation batches are made: device: each split is loaded once into "
            "device memory and sampled, padded, warped and normalized there; loader: DataLoader workers read "
            "the store every epoch; auto: the device on CUDA where the three splits fit in --device-budget, the "
            "loader otherwise. Changes where batches are made, never their pixels: may differ on a resume",
        },
    )
    device_budget: float = field(
        default=0.5,
        metadata={
            "metavar": "FRACTION",
            "help": "the share of the device's free memory (at the cell's start) that --data-on auto may fill "
            "with the splits (default 0.5: the rest is the model's)",
        },
    )
    precision: str = field(
        default="auto",
        metadata={
            "choices": ("auto", "bf16", "fp16", "fp32"),
            "help": "auto: bf16 autocast on GPUs with bf16 tensor cores, fp16 with a gradient scaler on older "
            "ones (V100, T4), fp32 on the CPU. Chosen at the cell's first start and kept by every resume "
            "(result.json 'settings' records it)",
        },
    )
    channels_last: bool = field(default=True, metadata={"help": "channels_last memory format on CUDA"})
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the model (off by default: see README 'GPU speed' for the measurement)"},
    )
    sync_bn: bool = field(default=False, metadata={"help": "SyncBatchNorm across processes"})
    nproc: int = field(default=1, metadata={"help": "processes on this machine (DDP, gloo on CPU / NCCL on GPU)"})
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes per rank"})
    eval_batch_size: int = field(default=128, metadata={"help": "per-rank batch size for validation and test"})
    ckpt_every_steps: int = field(default=0, metadata={"help": "also checkpoint every N steps (0: off)"})
    ckpt_every_min: float = field(
        default=10.0,
        metadata={
            "help": "checkpoint the training state every M minutes of wall time (0: off); a stop signal "
            "(SIGUSR2, SIGTERM) also checkpoints, an epoch's end does not"
        },
    )
    keep: str = field(
        default=KEEP_DEFAULT,
        metadata={
            "help": "the weights a done cell keeps: best,final (default), best, final or none; the training "
            "state (last.pt, previous.pt) is dropped whatever the choice. Later stages read best.pt (transfers "
            "and merges start from a Stage-A cell's); the collector reads only result.json"
        },
    )
    device: str = field(default="auto", metadata={"help": "auto (cuda if present), cpu or cuda"})
    progress: bool = field(default=True, metadata={"help": "progress bar on a terminal (--no-progress to hide)"})
    stage_to: Optional[str] = field(
        default=None,
        metadata={
            "metavar": "DIR",
            "help": "copy the dataset's files once per node into DIR on the node's local disk and read them from "
            "there (the cells of one node share the copy; the last one removes it). Default: $SLURM_TMPDIR where "
            "the site sets it, else off; 'off' turns it off; $VARIABLES in DIR are expanded on the node. Where a "
            "cell reads its data, not what it computes: not recorded in config.json",
        },
    )


def resolved(cfg: TrainConfig, card: str | None = None) -> TrainConfig:
    """Fill the recipe and protocol defaults (docs/method.md §3) so config.json records what actually ran;
    ``card``: the dataset's card (its attrs), which decides the paper's validation transform and LR."""
    values = asdict(cfg)
    stage_a, paper = cfg.mode == "scratch", cfg.protocol == "paper"
    card = card or cfg.dataset
    if values["optimizer"] is None:
        values["optimizer"] = ("adas" if paper else "sgd") if stage_a else "adamp"
    if values["valid_transform"] == "auto":
        values["valid_transform"] = protocol.valid_transform(cfg.protocol, card)
    if paper and values["precision"] == "auto":
        values["precision"] = protocol.PRECISION
    if values["step_size"] is None:
        values["step_size"] = 25 if stage_a else 20
    if values["lr"] is None:
        values["lr"] = 0.03 if stage_a else protocol.TARGET_LR.get(card, 1e-4)
    return TrainConfig(**values)


def kept_weights(keep: str) -> frozenset[str]:
    """The files --keep names, as a subset of KEEP_CHOICES ("best", "final"); a one-line UserError otherwise."""
    words = [w.strip() for w in str(keep).split(",")]
    if words == [KEEP_NONE]:
        return frozenset()
    if not all(w in KEEP_CHOICES for w in words):
        raise UserError(f"--keep {keep!r}: choose best,final (the default), best, final or none")
    return frozenset(words)


def config_dict(cfg: TrainConfig) -> dict:
    """The config as config.json and result.json record it: what the cell computes, from which store. Where
    a node staged the data (stage_to, the store it read from) is a site detail and is left out, so a cell
    resumed on another node, or with staging off, has the same record."""
    values = asdict(cfg)
    del values["stage_to"]
    values["store"] = getattr(cfg, _RECORDED_STORE, cfg.store)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}


# -- node-local staging (histokt.store.stage) ------------------------------------------------------------------

STAGE_OFF = "off"
STAGE_DEFAULT_ENV = "SLURM_TMPDIR"  # a site convention (set per job to node-local disk), not SLURM's own
_RECORDED_STORE = "_recorded_store"
_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def stage_dir(value: str | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """Where --stage-to (or a spec's stage_to) puts the node-local copy: the folder given, its $VARIABLES
    expanded from ``environ`` (the process's environment); $SLURM_TMPDIR where none is given and the site
    sets it to a folder that exists here; None (no staging) for 'off', or for no value and no such folder
    (e.g. a container that does not bind $SLURM_TMPDIR reads from the store, as before)."""
    env = os.environ if environ is None else environ
    if value is None:
        default = env.get(STAGE_DEFAULT_ENV, "")
        return Path(default) if default and Path(default).is_dir() else None
    if value.strip() == STAGE_OFF:
        return None

    def variable(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if not env.get(name):
            raise UserError(f"--stage-to {value}: ${name} is not set here; give a folder, or 'off'")
        return env[name]

    folder = _VARIABLE.sub(variable, value).strip()
    if not folder:
        raise UserError("--stage-to: an empty folder; give a folder on node-local disk, or 'off'")
    return Path(folder).expanduser()


def reading_from(cfg: TrainConfig, store) -> TrainConfig:
    """``cfg`` reading its patches from ``store`` (a staged copy) while config_dict still records the store
    it was given."""
    staged = replace(cfg, store=Path(store))
    setattr(staged, _RECORDED_STORE, getattr(cfg, _RECORDED_STORE, cfg.store))
    return staged
