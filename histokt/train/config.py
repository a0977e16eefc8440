"""The configuration of one training cell, importable without torch (planning thousands of cells stays light)."""

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

# Options that change how a run executes, not what it computes: they may differ on a resume.
OPERATIONAL = ("workers", "progress", "ckpt_every_steps", "ckpt_every_min", "nproc", "device")


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
        default=None, metadata={"help": "adamp, sgd, adam, adamw (default: sgd for scratch, adamp for fine/deep)"}
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
    precision: str = field(
        default="auto",
        metadata={"choices": ("auto", "bf16", "fp32"), "help": "auto: bf16 autocast on CUDA, fp32 on CPU"},
    )
    channels_last: bool = field(default=True, metadata={"help": "channels_last memory format on CUDA"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    sync_bn: bool = field(default=False, metadata={"help": "SyncBatchNorm across processes"})
    nproc: int = field(default=1, metadata={"help": "processes on this machine (DDP, gloo on CPU / NCCL on GPU)"})
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes per rank"})
    eval_batch_size: int = field(default=128, metadata={"help": "per-rank batch size for validation and test"})
    ckpt_every_steps: int = field(default=0, metadata={"help": "also checkpoint every N steps (0: off)"})
    ckpt_every_min: float = field(default=10.0, metadata={"help": "also checkpoint every M minutes (0: off)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if present), cpu or cuda"})
    progress: bool = field(default=True, metadata={"help": "progress bar on a terminal (--no-progress to hide)"})


def resolved(cfg: TrainConfig) -> TrainConfig:
    """Fill the recipe defaults (docs/method.md §3) so config.json records what actually ran."""
    from histokt.train.recipes import TARGET_LR

    values = asdict(cfg)
    stage_a = cfg.mode == "scratch"
    if values["optimizer"] is None:
        values["optimizer"] = "sgd" if stage_a else "adamp"
    if values["step_size"] is None:
        values["step_size"] = 25 if stage_a else 20
    if values["lr"] is None:
        values["lr"] = 0.03 if stage_a else TARGET_LR.get(cfg.dataset, 1e-4)
    return TrainConfig(**values)


def config_dict(cfg: TrainConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
