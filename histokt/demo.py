"""`histokt demo`: a synthetic histology-like collection, standardized into a store, on 2 CPU cores.

The images are SYNTHETIC (no download): H&E-coloured textures whose nuclei density and size differ by
class, so a network can learn them. They are written in a real card's raw layout and go through the
same code path as a real dataset.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .standardize import StandardizeConfig, standardize

# class -> (nuclei per 100x100 px, nucleus radius px); distinct enough to learn, close enough to be a task
DEMO_CLASSES = {"ADI": (2, 5), "LYM": (40, 4), "MUC": (6, 6), "MUS": (10, 3), "NORM": (18, 5), "STR": (8, 4), "TUM": (28, 7)}


@dataclass
class DemoConfig:
    out: Path = field(default=Path("demo"), metadata={"help": "folder for the raw data and the store (default: demo)"})
    per_class: int = field(default=12, metadata={"help": "images per class (default 12)"})
    workers: int = field(default=2, metadata={"help": "worker processes (default 2)"})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic images (default 0)"})


def synthetic_tile(size: int, density: float, radius: int, rng: np.random.Generator) -> np.ndarray:
    """An H&E-like tile: pink stroma texture with purple nuclei."""
    h = w = size
    stroma = rng.normal(0, 1, (h // 4, w // 4))
    stroma = np.asarray(Image.fromarray(((stroma + 3) * 40).clip(0, 255).astype(np.uint8)).resize((w, h)))
    img = np.empty((h, w, 3), np.float32)
    img[..., 0] = 225 - stroma * 0.25
    img[..., 1] = 160 - stroma * 0.45
    img[..., 2] = 205 - stroma * 0.2
    n = rng.poisson(density * h * w / 10000)
    yy, xx = np.ogrid[:h, :w]
    for cy, cx, r in zip(rng.integers(0, h, n), rng.integers(0, w, n), rng.integers(radius - 1, radius + 2, n)):
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, h), max(cx - r, 0), min(cx + r + 1, w)
        disk = (yy[y0:y1] - cy) ** 2 + (xx[:, x0:x1] - cx) ** 2 <= r * r
        img[y0:y1, x0:x1][disk] = (95, 55, 140)
    out = Image.fromarray(img.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))
    return np.asarray(out)


def write_crc_like(root: Path, per_class: int, seed: int) -> Path:
    """A CRC-like raw tree (NCT-CRC-HE-100K-NONORM/<class>/*.tif and CRC-VAL-HE-7K/) at 0.5 µm/px."""
    rng = np.random.default_rng(seed)
    for part, n in (("NCT-CRC-HE-100K-NONORM", per_class), ("CRC-VAL-HE-7K", max(2, per_class // 3))):
        for name, (density, radius) in DEMO_CLASSES.items():
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                path = folder / f"{name}-DEMO{i:04d}.tif"
                if not path.exists():
                    Image.fromarray(synthetic_tile(224, density, radius, rng)).save(path)
    return root


MHIST_CLASSES = {"HP": (12, 4), "SSA": (30, 6)}


def write_mhist_like(root: Path, per_class: int, seed: int) -> Path:
    """An MHIST-like raw tree (images/MHIST_*.png + annotations.csv, official train/test) at 1.25 µm/px."""
    import csv

    rng = np.random.default_rng(seed + 1)
    rows = []
    for k in range(2 * per_class):
        label = list(MHIST_CLASSES)[k % 2]
        name = f"MHIST_{k:04d}.png"
        path = root / "images" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(synthetic_tile(224, *MHIST_CLASSES[label], rng)).save(path)
        rows.append((name, label, 6 if label == "SSA" else 0, "test" if k >= 2 * per_class - 4 else "train"))
    with (root / "annotations.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image Name", "Majority Vote Label", "Number of Annotators who Selected SSA (Out of 7)",
                         "Partition"])
        writer.writerows(rows)
    return root


def write_collection(out: Path, per_class: int, seed: int) -> dict[str, Path]:
    """Every synthetic raw dataset of the demo, by dataset name."""
    return {
        "crc": write_crc_like(Path(out) / "raw" / "crc", per_class, seed),
        "mhist": write_mhist_like(Path(out) / "raw" / "mhist", per_class, seed),
    }


def run_demo(cfg: DemoConfig) -> dict:
    raw = write_crc_like(Path(cfg.out) / "raw" / "crc", cfg.per_class, cfg.seed)
    store = Path(cfg.out) / "store.zarr"
    return standardize(StandardizeConfig(dataset="crc", raw=raw, store=store, workers=cfg.workers))
