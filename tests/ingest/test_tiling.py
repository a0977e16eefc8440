"""Per-image standardization primitives: tiling geometry, mirror padding, the low-contrast filter."""

import numpy as np
import pytest

import histokt.ingest.tiling as tiling
from histokt.ingest.tiling import (
    _LUMA,
    FilterParams,
    exact_low_contrast,
    is_low_contrast,
    mirror_pad,
    rescale,
    rescaled_size,
    tile_boxes,
)


def test_tile_boxes_full_windows_row_major():
    # 700 wide: x0 in 0, 204, 408 (408 + 272 = 680 <= 700); 500 high: y0 in 0, 204
    boxes = tile_boxes(500, 700, 272, 204)
    assert boxes == [
        (0, 0, 272, 272),
        (204, 0, 476, 272),
        (408, 0, 680, 272),
        (0, 204, 272, 476),
        (204, 204, 476, 476),
        (408, 204, 680, 476),
    ]
    assert tile_boxes(271, 1000, 272, 204) == []


def test_mirror_pad_reflects_without_repeating_the_edge():
    img = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3)
    out = mirror_pad(img, 8)
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[:5, :4], img)
    np.testing.assert_array_equal(out[5, :4], img[3])  # row after the last mirrors the one before it
    np.testing.assert_array_equal(out[:5, 4], img[:, 2])
    big = np.zeros((300, 300, 3), np.uint8)
    assert mirror_pad(big, 272) is big


def test_rescale_size_rounds():
    img = np.zeros((100, 120, 3), np.uint8)
    assert rescale(img, 0.42).shape == (42, 50, 3)
    assert rescale(img, 1.0) is img
    mask = np.arange(100 * 120, dtype=np.int32).reshape(100, 120) % 7
    small = rescale(mask, 0.5, labels=True)
    assert small.shape == (50, 60) and set(np.unique(small)) <= set(range(7))  # nearest: no new codes


@pytest.mark.parametrize("sigma", [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 20, 40])
def test_fast_filter_decision_equals_the_percentile_rule(sigma):
    rng = np.random.default_rng(sigma)
    params = FilterParams()
    for _ in range(5):
        base = rng.integers(30, 230)
        patch = np.clip(base + rng.normal(0, sigma, (272, 272, 1)) * [1, 1.2, 0.8], 0, 255).astype(np.uint8)
        gray = patch.reshape(-1, 3).astype(np.float32) @ _LUMA
        assert is_low_contrast(patch, params) == exact_low_contrast(gray, params)


def test_filter_threshold_is_skimage_is_low_contrast():
    # (p99 - p5) / 2 < 0.05 on gray in [0, 1]: a flat patch is low-contrast, a half black / half white one not
    params = FilterParams()
    assert is_low_contrast(np.full((272, 272, 3), 200, np.uint8), params)
    two = np.zeros((272, 272, 3), np.uint8)
    two[:, 136:] = 255
    assert not is_low_contrast(two, params)
    # a spread of 20 gray levels (0.078 < 0.1) is low-contrast, 30 levels (0.118) is not
    ramp = lambda levels: np.linspace(100, 100 + levels, 272 * 272).reshape(272, 272, 1).repeat(3, 2).astype(np.uint8)
    assert is_low_contrast(ramp(21), params) and not is_low_contrast(ramp(33), params)


def test_tile_boxes_take_a_window_that_ends_exactly_on_the_edge():
    assert tile_boxes(272, 272, 272, 204) == [(0, 0, 272, 272)]
    # 680 = 408 + 272: the third window fits exactly; 679 leaves it out
    assert [b[0] for b in tile_boxes(272, 680, 272, 204)] == [0, 204, 408]
    assert [b[0] for b in tile_boxes(272, 679, 272, 204)] == [0, 204]
    assert [b[1] for b in tile_boxes(680, 272, 272, 204)] == [0, 204, 408]
    # the step is the stride, not the patch: 68 px steps over 408 px
    assert [b[0] for b in tile_boxes(272, 408, 272, 68)] == [0, 68, 136]
    assert all(x1 - x0 == 272 and y1 - y0 == 272 for x0, y0, x1, y1 in tile_boxes(700, 900, 272, 100))


def test_rescaled_size_rounds_to_nearest_and_never_below_one():
    assert rescaled_size(97, 10, 0.7) == (68, 7)  # 67.9 -> 68, not truncated to 67
    assert rescaled_size(3, 2, 0.1) == (1, 1)
    img = np.zeros((10, 97, 3), np.uint8)
    assert rescale(img, 0.7).shape == (7, 68, 3)  # (height, width) of (width, height)
    from PIL import Image

    assert rescale(Image.fromarray(img), 0.7).shape == (7, 68, 3)


def test_mirror_pad_only_the_short_side_and_masks():
    tall = np.arange(300 * 5, dtype=np.int32).reshape(300, 5)
    out = mirror_pad(tall, 8)
    assert out.shape == (300, 8)
    np.testing.assert_array_equal(out[:, :5], tall)
    np.testing.assert_array_equal(out[:, 5:], tall[:, [3, 2, 1]])


def test_low_contrast_bound_is_strict():
    # (p99 - p5) / 2 == fraction exactly (values exact in binary): not low-contrast; just above it: low-contrast
    gray = np.array([0.0] * 50 + [0.5] * 50, dtype=np.float32)
    assert not exact_low_contrast(gray, FilterParams(fraction=0.25))
    assert exact_low_contrast(gray, FilterParams(fraction=0.2500001))

    # the percentiles are the 5th and the 99th: 4 dark pixels in 100, or 1 bright one, do not count; 6 or 3 do
    def pixels(dark, bright):
        return np.array([0.2] * dark + [0.5] * (100 - dark - bright) + [0.9] * bright, dtype=np.float32)

    assert exact_low_contrast(pixels(4, 1), FilterParams())
    assert not exact_low_contrast(pixels(6, 0), FilterParams())
    assert not exact_low_contrast(pixels(0, 3), FilterParams())


def test_rescale_is_bilinear_without_overshoot_for_arrays_and_pillow_images():
    from PIL import Image

    step = np.array([[50] * 4 + [200] * 4] * 2, np.uint8)
    for image in (step, Image.fromarray(step)):
        row = rescale(image, 4.0)[0].tolist()
        assert len(row) == 32 and min(row) == 50 and max(row) == 200  # bicubic would ring below 50 / above 200
        assert row == sorted(row) and 50 < row[15] < 200  # a monotone ramp across the edge
    assert rescale(Image.fromarray(step), 2.0).shape == (4, 16)
    np.testing.assert_array_equal(rescale(Image.fromarray(step), 1.0), step)


def test_rescale_of_labels_is_nearest_and_keeps_the_dtype():
    mask = np.array([[0] * 3 + [100] * 3] * 2, np.uint8)
    up = rescale(mask, 2.5, labels=True)
    assert up.dtype == np.uint8 and up.shape == (5, 15)
    assert up[0].tolist() == [0] * 8 + [100] * 7  # no interpolated (or negative) codes


def gray_patch(levels) -> np.ndarray:
    """A 1-row RGB patch of gray pixels with these 0..255 levels."""
    c = np.asarray(levels, np.uint8)
    return np.stack([c, c, c], axis=-1)[None]


def no_full_percentile(monkeypatch):
    def refuse(gray, params):
        raise AssertionError("the full percentile was computed")

    monkeypatch.setattr(tiling, "exact_low_contrast", refuse)


@pytest.mark.parametrize("n", [21, 100])
def test_fast_filter_proves_texture_from_exactly_the_needed_counts(monkeypatch, n):
    # dark 100, middle 120, bright 138 (spread 0.149: textured). The 1-in-17 subsample sees dark and bright,
    # and exactly floor(h_lo) + 2 pixels are dark and n - floor(h_hi) bright: enough to decide without the
    # full percentile (3 and 2 of 21; 6 and 2 of 100)
    levels = [120] * n
    dark, bright = ([0, 18, 1], [17, 2]) if n == 21 else ([0, 17, 1, 2, 3, 4], [34, 51])
    for i in dark:
        levels[i] = 100
    for i in bright:
        levels[i] = 138
    no_full_percentile(monkeypatch)
    assert not is_low_contrast(gray_patch(levels), FilterParams())


def check_decision(patch, expected: bool) -> None:
    gray = patch.reshape(-1, 3).astype(np.float32) @ _LUMA
    assert exact_low_contrast(gray, FilterParams()) == expected
    assert is_low_contrast(patch, FilterParams()) == expected


def test_fast_filter_never_calls_a_flat_patch_textured_from_one_side():
    # 100 pixels, all at 125 but two dark (100) and two bright (138) ones: (p99 - p5) / 2 = 0.025, low-contrast.
    # The subsample (every 17th) sees dark and bright; the bright count alone is enough, the dark one is not.
    levels = [125] * 100
    levels[0] = levels[17] = 100
    levels[34] = levels[51] = 138
    check_decision(gray_patch(levels), True)
    # mirrored: six dark pixels (enough) but only one bright one
    levels = [118] * 100
    for i in (0, 17, 1, 2, 3, 4):
        levels[i] = 100
    levels[34] = 160
    check_decision(gray_patch(levels), True)


def test_fast_filter_needs_floor_h_plus_two_dark_pixels_on_a_full_size_patch():
    # 272 x 272: 3700 dark pixels (<= 100), one short of floor(0.05 * 73983) + 2 = 3701. p5 interpolates
    # between 100 and 129 (104.35), p99 is 129: (p99 - p5) / 2 = 0.048 < 0.05, low-contrast, although the
    # subsample (p5 90, p99 139) puts the counting window right between 100 and 129
    n = 272 * 272
    flat = np.full(n, 129, np.uint8)
    flat[0 : 17 * 219 : 17] = 90
    flat[17 * 219 : 17 * 264 : 17] = 139
    rest = np.arange(17 * 264, n)
    flat[rest[rest % 17 != 0][:3481]] = 100
    assert np.count_nonzero(flat <= 100) == 3700
    check_decision(np.repeat(flat.reshape(272, 272, 1), 3, axis=2), True)
