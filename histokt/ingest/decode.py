"""Safe image decoding: every raw image goes through here, so every bad file gets the same clear reason."""

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

# Largest image we decode (pixels). A 2 µm-per-pixel slide region of 20k x 20k is 400 Mpx; anything bigger
# than this in a patch dataset is a decompression bomb or the wrong file.
MAX_PIXELS = 400_000_000


class BadImage(Exception):
    """The image cannot be used; ``str(exc)`` is the reason recorded in the store's ``rejected`` list."""


def open_image(path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode ``path``, refusing empty, corrupt, truncated and oversized files."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(f"{w}x{h} pixels exceeds the {max_pixels:,}-pixel limit (decompression bomb?)")
            img.load()
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"corrupt or truncated image ({exc})") from None
    return img


def to_rgb(img: Image.Image) -> np.ndarray:
    """Return an (H, W, 3) uint8 array; convert grayscale, palette, 16-bit and opaque RGBA, refuse the rest."""
    return np.asarray(rgb_image(img), dtype=np.uint8)


def rgb_image(img: Image.Image) -> Image.Image:
    """The image in Pillow's RGB mode (no numpy copy: resizing first is cheaper on the full-size image)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("L", "P", "1", "CMYK", "YCbCr", "LA", "PA"):
        if mode in ("LA", "PA"):
            _check_opaque(img)
        return img.convert("RGB")
    if mode in ("RGBA", "RGBa"):
        _check_opaque(img)
        return img.convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grayscale: keep the high byte, so the full 0..65535 range maps onto 0..255.
        gray = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    raise BadImage(f"unsupported pixel mode {mode!r} (32-bit integer or float images have no known 0-255 range)")


def _check_opaque(img: Image.Image) -> None:
    alpha = np.asarray(img.getchannel("A"))
    if alpha.min() < 255:
        raise BadImage(f"{img.mode} image with transparent pixels (flatten it onto a background first)")


def load_rgb(path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    return to_rgb(open_image(path, max_pixels))


def load_rgb_image(path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    return rgb_image(open_image(path, max_pixels))


def load_labels(path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an integer label mask (e.g. BCSS) as an (H, W) integer array, no colour conversion."""
    img = open_image(path, max_pixels)
    if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N"):
        raise BadImage(f"label mask has pixel mode {img.mode!r}, expected a single-channel integer image")
    return np.asarray(img).astype(np.int32)


def image_size(path) -> tuple[int, int]:
    """(width, height) from the header alone, without decoding."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"corrupt or truncated image ({exc})") from None
