"""Patch augmentation as HistoKT (flips, affine ±45°, translate 10 %, nearest, zero fill) and normalization.

Randomness comes from (seed, epoch, sample index) alone, so a sample gets the same augmentation whatever
the worker count or the order samples are drawn in, and a resumed run repeats it exactly.

Speed matters here (the loader must feed a GPU): flips are folded into the single affine warp, which runs
in Pillow on uint8 (~0.2 ms per 272 px patch), and normalization is one fused multiply-add against
full-size constant arrays (broadcasting over a last axis of 3 is ~10x slower in numpy).
"""

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class Augment:
    """Callable (patch uint8 HWC, index) -> augmented uint8 HWC patch."""

    seed: int = 0
    epoch: int = 0
    degrees: float = 45.0
    translate: float = 0.1
    crop: int = 0  # > 0: a random crop of this size after the warp
    stream: int = 0  # > 0: draws of their own for the same (seed, epoch, index), e.g. augmented validation images

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int, epoch: int | None = None) -> np.random.Generator:
        key = (self.seed, self.epoch if epoch is None else epoch, int(index))
        return np.random.default_rng(key + (self.stream,) if self.stream else key)

    def __call__(self, patch: np.ndarray, index: int, epoch: int | None = None) -> np.ndarray:
        """``epoch`` (when given) overrides ``self.epoch``: samplers pass it with each index, because
        persistent DataLoader workers never see a ``set_epoch`` made in the main process."""
        rng = self.rng(index, epoch)
        h, w = patch.shape[:2]
        hflip, vflip, angle, tx, ty = self._draw(rng, h, w)
        out = warp(patch, angle, tx, ty, hflip, vflip)
        if self.crop:
            y, x = rng.integers(0, h - self.crop + 1), rng.integers(0, w - self.crop + 1)
            out = out[y : y + self.crop, x : x + self.crop]
        return out

    def _draw(self, rng: np.random.Generator, h: int, w: int) -> tuple:
        hflip, vflip = rng.random(2) < 0.5
        angle = rng.uniform(-self.degrees, self.degrees)
        tx = round(rng.uniform(-self.translate * w, self.translate * w))
        ty = round(rng.uniform(-self.translate * h, self.translate * h))
        return bool(hflip), bool(vflip), float(angle), tx, ty

    def params(self, index: int, epoch: int | None, h: int, w: int) -> np.ndarray:
        """The draws of ``__call__`` as [hflip, vflip, angle, tx, ty], for ``warp_batch`` on the GPU."""
        return np.array(self._draw(self.rng(index, epoch), h, w), dtype=np.float32)

    def batch_params(self, keys, h: int, w: int):
        """``params`` of each (epoch, index) key, as one float32 tensor [B, 5] (the batch's draws)."""
        import torch

        return torch.from_numpy(np.stack([self.params(i, e, h, w) for e, i in keys]))


def warp(patch: np.ndarray, angle: float, tx: int, ty: int, hflip: bool, vflip: bool) -> np.ndarray:
    """Flip, then rotate by ``angle`` degrees about the centre, then shift by (tx, ty): one nearest warp."""
    h, w = patch.shape[:2]
    cx, cy = w * 0.5, h * 0.5
    a = -math.radians(angle)  # positive = counter-clockwise, as torchvision
    cos, sin = math.cos(a), math.sin(a)
    fx, fy = (-1.0 if hflip else 1.0), (-1.0 if vflip else 1.0)
    # Pillow wants the inverse map, output pixel -> input pixel, in continuous coordinates whose pixel
    # centres sit at +0.5, so a plain flip about the centre (w/2, h/2) is exact on the integer grid.
    ox, oy = cx + tx, cy + ty
    a11, a12 = fx * cos, fx * sin
    a21, a22 = -fy * sin, fy * cos
    m = (a11, a12, cx - a11 * ox - a12 * oy, a21, a22, cy - a21 * ox - a22 * oy)
    img = Image.fromarray(patch).transform(
        (w, h), Image.Transform.AFFINE, m, resample=Image.Resampling.NEAREST, fillcolor=(0, 0, 0)
    )
    return np.asarray(img)


def warp_batch(images, params):
    """``warp`` for a whole batch on the device: images float [B, C, H, W], params [B, 5] from ``params``.

    Pillow's inverse map, in grid_sample's normalized coordinates (align_corners=False puts pixel centres
    at +0.5, as Pillow does): input = A (output - c - t) + c becomes theta = [A | -(2 / size) A t].
    Nearest sampling, zero fill. Pixels on a rounding boundary can land one pixel off Pillow's choice.
    """
    import torch
    import torch.nn.functional as F

    p = params.to(images.device, torch.float32)
    b, _, h, w = images.shape
    a = -torch.deg2rad(p[:, 2])
    cos, sin = torch.cos(a), torch.sin(a)
    fx, fy = 1 - 2 * p[:, 0], 1 - 2 * p[:, 1]
    a11, a12, a21, a22 = fx * cos, fx * sin * h / w, -fy * sin * w / h, fy * cos
    tx, ty = p[:, 3] * 2 / w, p[:, 4] * 2 / h
    theta = torch.stack(
        [torch.stack([a11, a12, -(a11 * tx + a12 * ty)], 1), torch.stack([a21, a22, -(a21 * tx + a22 * ty)], 1)], 1
    )
    grid = F.affine_grid(theta, [b, images.shape[1], h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class Normalize:
    """(x / 255 - mean) / std per channel, written into a float32 HWC buffer."""

    def __init__(self, mean, std):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._shape = None

    def _constants(self, shape):
        if self._shape != shape:
            scale = 1.0 / (255.0 * np.asarray(self.std, dtype=np.float32))
            shift = -np.asarray(self.mean, dtype=np.float32) / np.asarray(self.std, dtype=np.float32)
            self._scale = np.ascontiguousarray(np.broadcast_to(scale, shape), dtype=np.float32)
            self._shift = np.ascontiguousarray(np.broadcast_to(shift, shape), dtype=np.float32)
            self._shape = shape
        return self._scale, self._shift

    def __getstate__(self):
        return {"mean": self.mean, "std": self.std, "_shape": None}

    def into(self, patch: np.ndarray, out: np.ndarray) -> np.ndarray:
        scale, shift = self._constants(patch.shape)
        np.multiply(patch, scale, out=out)
        out += shift
        return out
