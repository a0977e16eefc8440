"""Standardization of one image: rescale to the target µm/px, mirror-pad, tile, and reject blank patches.

Follows HistoKT (docs/method.md §2) with one documented difference: the anti-aliased rescale is Pillow's
bilinear filter with a support widened by the downscale factor (area-aware), not skimage's Gaussian
pre-blur, so results are close to but not bitwise equal with the original's.
"""

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# ITU-R 709 luma weights, as skimage.color.rgb2gray.
_LUMA = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32) / 255.0


@dataclass(frozen=True)
class FilterParams:
    """skimage ``is_low_contrast`` on the gray image: drop if (p_upper - p_lower) / 2 < fraction."""

    fraction: float = 0.05
    lower_percentile: float = 5.0
    upper_percentile: float = 99.0


def rescaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(1, round(width * scale)), max(1, round(height * scale))


def rescale(image, scale: float, labels: bool = False) -> np.ndarray:
    """Resize by ``scale`` (native µm/px ÷ target µm/px); label masks use nearest neighbour.

    ``image`` may be an array or an RGB Pillow image; the result is an array."""
    if isinstance(image, Image.Image):
        if scale == 1.0:
            return np.asarray(image)
        return np.asarray(image.resize(rescaled_size(*image.size, scale), Image.Resampling.BILINEAR, reducing_gap=None))
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    size = rescaled_size(w, h, scale)
    if labels:
        return np.asarray(
            Image.fromarray(image.astype(np.int32), mode="I").resize(size, Image.Resampling.NEAREST)
        ).astype(image.dtype)
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=None))


def rescale_codes(codes: np.ndarray, scale: float) -> np.ndarray:
    """Resize an integer code mask bilinearly, as HistoKT resized BCSS masks: int32 codes out.

    HistoKT read the mask as an image and rescaled it like one (skimage ``rescale``, order 1, Gaussian
    anti-aliasing, ``preserve_range``), then cast to uint8: inside a region the code is kept; across a
    boundary the interpolated value is truncated to an integer, which may be the code of another class
    (between tumor 1 and fat 9: 2..8, stroma to metaplasia). Here the resampler is the images' (Pillow's
    area-aware bilinear, tiling's one documented difference), on float32 codes, then truncated likewise;
    its normalized weights keep a region of one code exactly at that code (tested), so truncation never
    turns a whole region into the code below.
    """
    if scale == 1.0:
        return codes.astype(np.int32, copy=False)
    h, w = codes.shape[:2]
    image = Image.fromarray(np.ascontiguousarray(codes, dtype=np.float32))
    smooth = np.asarray(image.resize(rescaled_size(w, h, scale), Image.Resampling.BILINEAR, reducing_gap=None))
    return smooth.astype(np.int32)  # truncation, as HistoKT's astype(np.uint8); codes are >= 0


def mirror_pad(image: np.ndarray, patch_size: int) -> np.ndarray:
    """Pad bottom/right to at least ``patch_size`` by mirroring without repeating the edge pixel."""
    h, w = image.shape[:2]
    pad_h, pad_w = max(0, patch_size - h), max(0, patch_size - w)
    if not (pad_h or pad_w):
        return image
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, widths, mode="reflect")


def tile_boxes(height: int, width: int, patch_size: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Full windows only, row-major; each box is (x0, y0, x1, y1) in the rescaled, padded image."""
    return [
        (x, y, x + patch_size, y + patch_size)
        for y in range(0, height - patch_size + 1, stride)
        for x in range(0, width - patch_size + 1, stride)
    ]


def is_low_contrast(patch: np.ndarray, params: FilterParams) -> bool:
    """skimage's decision, usually proven from two counts instead of a full percentile (3x faster).

    np.percentile interpolates between the order statistics at floor(h) and floor(h) + 1, h = (n - 1) q / 100.
    If at least floor(h_lo) + 2 pixels are <= a, both are <= a, so p_lo <= a; if at least n - floor(h_hi)
    pixels are >= b, p_hi >= b. With b - a > 2 * fraction (plus a margin far above float rounding) the patch
    is then provably textured. A 1-in-17 subsample only picks a and b; whatever it cannot prove goes
    through the full percentile, so the decision never changes.
    """
    gray = patch.reshape(-1, 3).astype(np.float32) @ _LUMA
    n = gray.size
    lo, hi = np.percentile(gray[::17], [params.lower_percentile, params.upper_percentile])
    if hi - lo > 2 * params.fraction + 0.02:
        mid = 0.5 * (lo + hi)
        a, b = mid - params.fraction - 0.005, mid + params.fraction + 0.005
        need_lo = math.floor((n - 1) * params.lower_percentile / 100) + 2
        need_hi = n - math.floor((n - 1) * params.upper_percentile / 100)
        if np.count_nonzero(gray <= a) >= need_lo and np.count_nonzero(gray >= b) >= need_hi:
            return False
    return exact_low_contrast(gray, params)


def exact_low_contrast(gray: np.ndarray, params: FilterParams) -> bool:
    lo, hi = np.percentile(gray, [params.lower_percentile, params.upper_percentile])
    return (hi - lo) / 2.0 < params.fraction
