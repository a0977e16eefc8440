"""`histokt demo`: a whole HistoKT study in minutes on 2 CPU cores, on a SYNTHETIC collection.

Three small datasets are generated (no download) in the raw layouts of real cards, each at its own µm/px
and with its own stain colours (the domain shift): a CRC-like class-folder tree (0.5 µm/px), an MHIST-like
image folder with its CSV (1.25 µm/px) and a PCam-like HDF5 pair (0.972 µm/px). Classes differ by the
density and size of nuclei, which a ResNet18 learns. A stand-in "ImageNet" checkpoint (random weights of
the right shapes) is staged where torchvision's cache would be, so the ImageNet family runs offline.
Then the demo spec (`jobs/demo.toml`, shipped inside the package as ``histokt/batch/demo.toml`` so that
any install finds it), with its paths pointed at the output folder, goes through the same code path as
a cluster study: standardize, pretrain (random and ImageNet init), transfer (fine and deep), distill,
collect.
"""

import csv
import importlib.resources
import os
import sys
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageFilter

from histokt import atomic
from histokt.errors import UserError
from histokt.study import spec

# package data (setup.cfg [options.package_data]): an installed wheel has no jobs/ folder. jobs/demo.toml is the
# same file for users to read and copy; tests/batch/test_demo_package.py keeps the two identical.
TEMPLATE = importlib.resources.files("histokt.batch") / "demo.toml"

# class -> (nuclei per 100x100 px, nucleus radius px); distinct enough to learn, close enough to be a task
DEMO_CLASSES = {
    "ADI": (2, 5),
    "LYM": (40, 4),
    "MUC": (6, 6),
    "MUS": (10, 3),
    "NORM": (18, 5),
    "STR": (8, 4),
    "TUM": (28, 7),
}
MHIST_CLASSES = {"HP": (12, 4), "SSA": (30, 6)}
PCAM_CLASSES = {"non_tumor": (8, 3), "tumor": (35, 5)}
# (stroma RGB, nucleus RGB) per dataset: each scanner and lab stains differently
STAINS = {
    "crc": ((225, 160, 205), (95, 55, 140)),
    "mhist": ((235, 185, 200), (120, 60, 120)),
    "pcam": ((200, 140, 215), (70, 40, 150)),
}


@dataclass
class DemoConfig:
    out: Path = field(default=Path("demo"), metadata={"help": "folder for the raw data, store and runs (demo)"})
    executor: str = field(
        default="local", metadata={"choices": ("local", "slurm"), "help": "run the cells here (local) or on SLURM"}
    )
    per_class: int = field(
        default=12,
        metadata={
            "help": "synthetic images per class; with --raw-root, at most this many real images per class and "
            "official partition, unless the dataset sets max_per_class (default 12)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the synthetic images (default 0)"})
    parallel: int = field(default=2, metadata={"help": "local executor: cells at once (default 2)"})
    max_queued: Optional[int] = field(
        default=None,
        metadata={"help": "slurm: most of the demo's tasks queued or running at once; the rest follow in waves"},
    )
    container: Optional[str] = field(
        default=None,
        metadata={"help": "slurm: Apptainer image (.sif) to run every cell in (make image builds one)"},
    )
    pool: Optional[int] = field(
        default=None,
        metadata={"help": "N workers that take cell after cell (sweep --pool), instead of one task per cell"},
    )
    raw_root: Optional[Path] = field(
        default=None,
        metadata={
            "help": "run the demo spec on real data: DIR/crc, DIR/mhist, DIR/pcam laid out as "
            "the cards expect, or the datasets of --datasets (nothing synthetic is "
            "generated)"
        },
    )
    datasets: Optional[Path] = field(
        default=None,
        metadata={
            "help": "a TOML file of [datasets.NAME] tables (as in a spec; raw relative to "
            "--raw-root) replacing the demo's crc/mhist/pcam: each is pretrained, "
            "transferred to every other, and all but the last are merged and tuned "
            "on the last; e.g. jobs/demo-shared-data.toml"
        },
    )
    progress: bool = field(default=True, metadata={"help": "progress bars (--no-progress to hide)"})


def synthetic_tile(size: int, density: float, radius: int, rng: np.random.Generator, stain=STAINS["crc"]):
    """An H&E-like tile: stroma texture with nuclei."""
    (sr, sg, sb), nucleus = stain
    h = w = size
    stroma = rng.normal(0, 1, (h // 4, w // 4))
    stroma = np.asarray(Image.fromarray(((stroma + 3) * 40).clip(0, 255).astype(np.uint8)).resize((w, h)))
    img = np.empty((h, w, 3), np.float32)
    img[..., 0] = sr - stroma * 0.25
    img[..., 1] = sg - stroma * 0.45
    img[..., 2] = sb - stroma * 0.2
    n = rng.poisson(density * h * w / 10000)
    yy, xx = np.ogrid[:h, :w]
    for cy, cx, r in zip(rng.integers(0, h, n), rng.integers(0, w, n), rng.integers(radius - 1, radius + 2, n)):
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, h), max(cx - r, 0), min(cx + r + 1, w)
        disk = (yy[y0:y1] - cy) ** 2 + (xx[:, x0:x1] - cx) ** 2 <= r * r
        img[y0:y1, x0:x1][disk] = nucleus
    out = Image.fromarray(img.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))
    return np.asarray(out)


def write_crc_like(root: Path, per_class: int, seed: int) -> Path:
    """NCT-CRC-HE-100K-NONORM/<class>/*.tif and CRC-VAL-HE-7K/ (the test split), 224 px at 0.5 µm/px."""
    rng = np.random.default_rng(seed)
    for part, n in (("NCT-CRC-HE-100K-NONORM", per_class), ("CRC-VAL-HE-7K", max(2, per_class // 3))):
        for name, (density, radius) in DEMO_CLASSES.items():
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                path = folder / f"{name}-DEMO{i:04d}.tif"
                if not path.exists():
                    Image.fromarray(synthetic_tile(224, density, radius, rng, STAINS["crc"])).save(path)
    return root


def write_mhist_like(root: Path, per_class: int, seed: int) -> Path:
    """images/MHIST_*.png + annotations.csv (official train/test), 224 px at 1.25 µm/px."""
    rng = np.random.default_rng(seed + 1)
    rows = []
    for k in range(2 * per_class):
        label = list(MHIST_CLASSES)[k % 2]
        name = f"MHIST_{k:04d}.png"
        path = root / "images" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(synthetic_tile(224, *MHIST_CLASSES[label], rng, STAINS["mhist"])).save(path)
        rows.append((name, label, 6 if label == "SSA" else 0, "test" if k >= 2 * per_class - 4 else "train"))
    with (root / "annotations.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["Image Name", "Majority Vote Label", "Number of Annotators who Selected SSA (Out of 7)", "Partition"]
        )
        writer.writerows(rows)
    return root


def write_pcam_like(root: Path, per_class: int, seed: int) -> Path:
    """camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5: 96 px patches at 0.972 µm/px."""
    import h5py

    rng = np.random.default_rng(seed + 2)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 2 * per_class), ("valid", max(2, per_class // 2)), ("test", max(2, per_class // 2))):
        x_path = root / f"camelyonpatch_level_2_split_{split}_x.h5"
        y_path = root / f"camelyonpatch_level_2_split_{split}_y.h5"
        if x_path.exists() and y_path.exists():
            continue
        labels = np.arange(n) % 2
        x = np.stack([synthetic_tile(96, *list(PCAM_CLASSES.values())[c], rng, STAINS["pcam"]) for c in labels])
        with h5py.File(x_path, "w") as f:
            f.create_dataset("x", data=x.astype(np.uint8))
        with h5py.File(y_path, "w") as f:
            f.create_dataset("y", data=labels.astype(np.uint8).reshape(n, 1, 1, 1))
    return root


def write_collection(out: Path, per_class: int, seed: int) -> dict[str, Path]:
    """Every synthetic raw dataset of the demo, by dataset name (the names jobs/demo.toml uses)."""
    raw = Path(out) / "raw"
    return {
        "crc": write_crc_like(raw / "crc", per_class, seed),
        "mhist": write_mhist_like(raw / "mhist", per_class, seed),
        "pcam": write_pcam_like(raw / "pcam", per_class, seed),
    }


def stage_imagenet_stand_in(out: Path) -> Path:
    """Random weights of ResNet18's shapes where torchvision keeps ImageNet's; TORCH_HOME points there."""
    from histokt.train.models import imagenet_cache_path, stand_in_imagenet

    torch_home = (Path(out) / "torch").absolute()
    os.environ["TORCH_HOME"] = str(torch_home)  # the cells (local processes or SLURM jobs) inherit it
    path = imagenet_cache_path("resnet18")
    if not path.exists():
        stand_in_imagenet(path)
    return path


def demo_spec(cfg: "DemoConfig") -> dict:
    """jobs/demo.toml with its paths pointed at OUT, its raw data at the synthetic collection or at --raw-root,
    and with --datasets, its stages re-pointed at those datasets. Writes nothing: bad input fails first."""
    if cfg.container and cfg.executor != "slurm":
        raise UserError("--container: only with --executor slurm (the local executor runs cells on this host)")
    out = Path(cfg.out).absolute()
    doc = tomllib.loads(TEMPLATE.read_text())
    doc["study"]["store"] = str(out / "store.zarr")
    doc["study"]["run_root"] = str(out / "runs")
    if cfg.raw_root is None:
        for name, table in doc["datasets"].items():
            table["raw"] = str(out / "raw" / name)
        return doc
    if cfg.datasets is not None:
        doc["datasets"] = read_datasets(Path(cfg.datasets))
        repoint_stages(doc, list(doc["datasets"]))
    else:  # the demo's own datasets: DIR/crc, DIR/mhist, DIR/pcam
        for name, table in doc["datasets"].items():
            table["raw"] = name
    raw_root = Path(os.path.abspath(cfg.raw_root))  # without "..": the paths are read in job logs
    for table in doc["datasets"].values():
        table["raw"] = str(raw_root / table["raw"])  # an absolute raw path stays as it is
        table.setdefault("max_per_class", cfg.per_class)  # minutes, not hours, on a full download
    return doc


def write_spec(cfg: "DemoConfig", doc: dict) -> Path:
    """The rendered spec, OUT/demo.toml: what the sweep reads and stores in the run root."""
    path = Path(cfg.out).absolute() / "demo.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    # no absolute paths in the header: a re-run from another folder must render the same spec (same digest)
    header = "# rendered by `histokt demo` from jobs/demo.toml" + (
        f" and {Path(cfg.datasets).name}" if cfg.datasets else ""
    )
    atomic.write_bytes(path, (header + "\n" + spec.to_toml(doc)).encode())
    return path


def read_datasets(path: Path) -> dict:
    """A --datasets file: [datasets.NAME] tables as in a spec, their raw paths relative to --raw-root."""
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"--datasets {path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"--datasets {path}: not valid TOML ({exc})") from None
    extra = sorted(set(doc) - {"datasets"})
    if extra or not isinstance(doc.get("datasets"), dict) or len(doc["datasets"]) < 2:
        raise UserError(
            f"--datasets {path}: expected only [datasets.NAME] tables, at least two "
            f"(found {', '.join(extra) or len(doc.get('datasets') or {})})"
        )
    for name, table in doc["datasets"].items():
        if not isinstance(table, dict) or "raw" not in table:
            raise UserError(f"--datasets {path}: datasets.{name}.raw: missing (the folder under --raw-root)")
        spec.parse_dataset(name, table, str(path))
    return doc["datasets"]


def repoint_stages(doc: dict, names: list) -> None:
    """The demo's stages on other datasets: each pretrained, every one transferred to every other, and all but
    the last merged by weight distillation and deep-tuned on the last (three datasets at least)."""
    stages = doc["stages"]
    stages["pretrain"]["datasets"] = list(names)
    stages["transfer"]["sources"] = stages["transfer"]["targets"] = list(names)
    if len(names) >= 3:
        stages["distill"]["source_sets"] = [names[:-1]]
        stages["distill"]["targets"] = [names[-1]]
    else:
        print("demo: two datasets, so no weight distillation (it merges two sources into a third)", file=sys.stderr)
        del stages["distill"]


def run_demo(cfg: DemoConfig) -> dict:
    from histokt.batch.sweep import SweepConfig, sweep, watch

    if cfg.per_class < 2:
        raise UserError(f"--per-class {cfg.per_class}: at least 2 images per class")
    if cfg.raw_root is not None and not Path(cfg.raw_root).is_dir():
        raise UserError(f"--raw-root {cfg.raw_root}: no such folder")
    if cfg.datasets is not None and cfg.raw_root is None:
        raise UserError(f"--datasets {cfg.datasets}: pass --raw-root DIR too (the folder its raw paths are under)")
    doc = demo_spec(cfg)
    out = Path(cfg.out).absolute()
    if cfg.raw_root is None:
        print(f"demo: writing the SYNTHETIC collection to {out / 'raw'} ...", file=sys.stderr)
        write_collection(out, cfg.per_class, cfg.seed)
    else:
        print(
            f"demo: real data from {os.path.abspath(cfg.raw_root)}, at most {cfg.per_class} images per class "
            f"and partition unless a dataset sets max_per_class (--per-class)",
            file=sys.stderr,
        )
    stage_imagenet_stand_in(out)
    spec_path = write_spec(cfg, doc)
    t = time.time()
    sweep_cfg = SweepConfig(
        spec=spec_path,
        executor=cfg.executor,
        parallel=cfg.parallel,
        progress=cfg.progress,
        max_queued=cfg.max_queued,
        container=cfg.container,
        pool=cfg.pool,
    )
    # waves, or pools whose workers may leave cells for new ones: stay and submit them as the queue drains
    if cfg.executor == "slurm" and (cfg.max_queued is not None or cfg.pool):
        result = watch(replace(sweep_cfg, watch_interval=5), report=lambda line: print(line, file=sys.stderr))
    else:
        result = sweep(sweep_cfg)
    if cfg.executor == "slurm" and result.get("status") == "submitted":
        wait_for_slurm(Path(result["run_root"]), cfg.progress)
    return {**result, "spec": str(spec_path), "seconds": time.time() - t, "summary": str(out / "runs" / "summary")}


def wait_for_slurm(run_root: Path, progress: bool) -> None:
    """Follow a submitted demo until its collector has run and nothing is queued (squeue, not sacct)."""
    from tqdm import tqdm

    from histokt.batch.slurm import queued_cells
    from histokt.study import plan

    cells = plan.read(run_root)
    total = sum(len(c) for c in cells.values())
    bar = tqdm(total=total, desc="slurm", unit="cell", file=sys.stderr, disable=None if progress else True)
    while queued_cells(run_root):  # the collector is queued last (afterany), so an empty queue means finished
        bar.update(sum(plan.is_done(run_root, c) for cs in cells.values() for c in cs) - bar.n)
        time.sleep(5)  # SLURM schedules in passes of seconds; polling the run root is cheap
    bar.close()
