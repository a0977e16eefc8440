"""BCSS (Amgad 2019), the 0.25 MPP set: 151 breast-cancer ROIs with integer segmentation masks.

Raw layout (GitHub PathologyDataScience/BCSS -> Google Drive "0.25 MPP" folder)::

    0_Public-data-Amgad2019_0.25MPP/
    ├── rgbs_colorNormalized/TCGA-<TSS>-<patient>-DX1_xmin<x>_ymin<y>_MPP-0.2500.png   RGB ROIs
    ├── masks/<same stem>.png                                                       integer class codes
    └── meta/gtruth_codes.tsv                                                       columns label, GT_code

Patches are labelled from their mask tile (HistoKT): a 10-class multi-hot vector by area fraction. The
codes are mapped to the 10 classes by NAME through gtruth_codes.tsv, so a renumbered release still
reads correctly. ``read_mask`` returns the mask already mapped to class numbers: 0 = outside the ROI or
any code that is not one of the 10 classes, c + 1 = ``classes[c]``; ``mask_label`` counts those.

Option ``mask_resize`` (how the mask follows the image to 1 µm/px):
- "nearest" (default): every rescaled pixel takes one native pixel's class; labels are never blended.
- "bilinear" (HistoKT parity): HistoKT loaded the mask as an RGB image and rescaled it like the image
  (skimage ``rescale``: bilinear, Gaussian anti-aliasing, ``preserve_range``), then cast the result to
  uint8 and counted, per class, the pixels whose value equals the class's GT_code. So the raw CODES are
  interpolated and truncated: a region of one code keeps it, but a boundary gets the integer codes in
  between (tumor 1 | fat 9 -> 2..8: stroma, lymphocytic_infiltrate, ..., metaplasia_NOS; outside 0 |
  stroma 2 -> 1: tumor), which then count for those classes. Reproduced here: codes interpolated by the
  images' resampler (tiling.rescale_codes), truncated, then mapped to classes (a code that is not one of
  the 10, or not in the table, counts as none). Only the boundary pixels differ from "nearest".
"""

import csv
import re
from pathlib import Path

import numpy as np

from histokt.errors import UserError, verify_download
from histokt.ingest.cards.base import DEFAULT_RATIOS, Card, CardIndex, Label, Source
from histokt.ingest.decode import BadImage, image_size, load_labels
from histokt.ingest.tiling import rescale, rescale_codes

IMAGES = "rgbs_colorNormalized"
MASKS = "masks"
CODES = "meta/gtruth_codes.tsv"
STEM_RE = re.compile(r"^TCGA-(?P<tss>[A-Z0-9]{2})-[A-Z0-9]{4}-\w+?_xmin\d+_ymin\d+_MPP-(?P<mpp>\d+(?:\.\d+)?)$")

# eva's institution split (docs/datasets/bcss.md); every other institution is train.
EVA_TEST = ("OL", "LL", "E2", "EW", "GM", "S3")
EVA_VALID = ("BH", "C8", "A8", "A1", "E9")
EVA_PLAN = {"train": {"train": 1.0}, "valid": {"valid": 1.0}, "test": {"test": 1.0}}
SPLITS = ("grouped", "eva")
MASK_RESIZE = ("nearest", "bilinear")


class BCSS(Card):
    name = "bcss"
    # HistoKT's 10 classes, in its index order (BCSSProcessing.py); names as in gtruth_codes.tsv.
    classes = (
        "tumor",
        "stroma",
        "lymphocytic_infiltrate",
        "necrosis_or_debris",
        "glandular_secretions",
        "blood",
        "metaplasia_NOS",
        "fat",
        "plasma_cells",
        "blood_vessel",
    )
    multi_label = True
    mpp = 0.25
    mpp_source = "filename (MPP-0.2500; HistoKT agrees)"
    group_rule = "institution (TCGA tissue-source-site code)"
    split_plan = {"all": DEFAULT_RATIOS}
    expected_counts = {"all": 151}
    # label_threshold: drop a patch whose 10 class fractions sum below it (HistoKT: 0.2 by one reading of
    # its code, 0.5 by another). presence: a class is positive from this fraction of the patch on (the
    # original binarization rule is not published). split: "grouped" = 80/10/10 by institution,
    # "eva" = eva's fixed institution lists. mask_resize: "nearest" or HistoKT's "bilinear" (module doc).
    OPTION_DEFAULTS = {"label_threshold": 0.2, "presence": 0.05, "split": "grouped", "mask_resize": "nearest"}
    # Overlap 0.75 -> int(272 * 0.25) = 68, one reading of HistoKT's code; the other reading (0.5) gives 136.
    default_stride = 68

    def __init__(self, **options):
        super().__init__(**options)
        self._luts: dict[str, np.ndarray] = {}  # raw dir -> code -> class-number lookup, filled from gtruth_codes.tsv

    def check_options(self) -> None:
        for key in ("label_threshold", "presence"):
            value = self.option_values[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise UserError(f"card bcss: option {key}={value!r} is not a number")
        if not 0.0 <= self.option_values["label_threshold"] <= 1.0:
            raise UserError(
                f"card bcss: option label_threshold={self.option_values['label_threshold']} must be in [0, 1]"
            )
        # presence 0 would make every absent class positive (0 >= 0).
        if not 0.0 < self.option_values["presence"] <= 1.0:
            raise UserError(f"card bcss: option presence={self.option_values['presence']} must be in (0, 1]")
        if self.option_values["split"] not in SPLITS:
            raise UserError(
                f"card bcss: option split={self.option_values['split']!r}, expected one of {', '.join(SPLITS)}"
            )
        if self.option_values["mask_resize"] not in MASK_RESIZE:
            raise UserError(
                f"card bcss: option mask_resize={self.option_values['mask_resize']!r}, "
                f"expected one of {', '.join(MASK_RESIZE)}"
            )

    # -- index --------------------------------------------------------------------------------------------
    def index(self, raw: Path) -> CardIndex:
        self.require_dir(raw, "the 0_Public-data-Amgad2019_0.25MPP folder")
        self._lut(raw)  # fail fast on a bad gtruth_codes.tsv
        images = self._pngs(raw / IMAGES, "the colour-normalized ROIs")
        masks = self._pngs(raw / MASKS, "the ROI masks")
        self._check_pairs(raw, images, masks)
        sources = []
        for stem in sorted(images):
            tss = self._parse(raw / IMAGES / f"{stem}.png", stem)
            sources.append(Source(f"{IMAGES}/{stem}.png", None, self._partition(tss), tss))
        sources.sort(key=lambda s: s.path)
        if self.option_values["split"] == "eva":  # eva publishes no per-split ROI counts
            return self.make_index(sources, split_plan=EVA_PLAN, expected_counts={})
        return self.make_index(sources)

    def _pngs(self, folder: Path, what: str) -> set[str]:
        self.require_dir(folder, what)
        stems = {p.stem for p in folder.iterdir() if p.is_file() and p.suffix == ".png"}
        if not stems:
            raise verify_download(self.name, folder, f"no .png files ({what})")
        return stems

    def _check_pairs(self, raw: Path, images: set[str], masks: set[str]) -> None:
        """Images and masks pair one to one by stem; name the first one without a partner."""
        if images - masks:
            stem = min(images - masks)
            raise verify_download(self.name, raw / IMAGES / f"{stem}.png", f"no mask {MASKS}/{stem}.png")
        if masks - images:
            stem = min(masks - images)
            raise verify_download(self.name, raw / MASKS / f"{stem}.png", f"no image {IMAGES}/{stem}.png")

    def _parse(self, path: Path, stem: str) -> str:
        """The institution code of a ROI, after checking the name and its MPP."""
        m = STEM_RE.match(stem)
        if not m:
            raise verify_download(
                self.name, path, "name does not match TCGA-<TSS>-<patient>-DX1_xmin<x>_ymin<y>_MPP-<mpp>.png"
            )
        if abs(float(m["mpp"]) - self.mpp) > 1e-6:
            raise verify_download(self.name, path, f"MPP {m['mpp']} in the file name, the card expects {self.mpp}")
        return m["tss"]

    def _partition(self, tss: str) -> str:
        if self.option_values["split"] == "grouped":
            return "all"
        return "test" if tss in EVA_TEST else "valid" if tss in EVA_VALID else "train"

    # -- codes --------------------------------------------------------------------------------------------
    def _lut(self, raw: Path) -> np.ndarray:
        """Lookup code -> class number (0 = none, c + 1 = classes[c], -1 = code not in the tsv)."""
        key = str(raw)
        if key not in self._luts:
            self._luts[key] = self._read_codes(raw / CODES)
        return self._luts[key]

    def _read_codes(self, path: Path) -> np.ndarray:
        self.require_file(path, "the mask code table (label, GT_code)")
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if not rows or not {"label", "GT_code"} <= {k.strip() for k in rows[0] if k}:
            raise verify_download(self.name, path, "expected tab-separated columns label and GT_code")
        codes: dict[str, int] = {}
        for row in rows:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            label, code = row["label"], row["GT_code"]
            if not code.isdigit():
                detail = f"GT_code {code!r} of {label!r} is not a non-negative integer"
                raise verify_download(self.name, path, detail)
            if label in codes:
                raise verify_download(self.name, path, f"label {label!r} appears twice")
            if int(code) in codes.values():
                raise verify_download(self.name, path, f"GT_code {code} appears twice")
            codes[label] = int(code)
        missing = [c for c in self.classes if c not in codes]
        if missing:
            raise verify_download(self.name, path, f"class(es) {missing} missing from the code table")
        lut = np.full(max(codes.values()) + 1, -1, dtype=np.int32)
        lut[list(codes.values())] = 0
        for number, cls in enumerate(self.classes, start=1):
            lut[codes[cls]] = number
        return lut

    # -- masks and patch labels ---------------------------------------------------------------------------
    def read_mask(self, raw: Path, source: Source) -> np.ndarray:
        """The ROI's mask mapped to class numbers (0 = none, c + 1 = classes[c]), checked against the image."""
        return self._lut(raw)[self._codes(raw, source)]

    def rescaled_mask(self, raw: Path, source: Source, scale: float) -> np.ndarray:
        """The mapped mask at the target resolution: nearest neighbour, or HistoKT's bilinear on the codes."""
        if self.option_values["mask_resize"] == "nearest":
            return rescale(self.read_mask(raw, source), scale, labels=True)
        codes = rescale_codes(self._codes(raw, source), scale)
        lut = np.maximum(self._lut(raw), 0)  # a code between two table codes but not in the table: none
        return lut[codes]

    def _codes(self, raw: Path, source: Source) -> np.ndarray:
        """The ROI's raw mask codes, checked against the image and the code table."""
        path = raw / MASKS / Path(source.path).name
        mask = load_labels(path, self.max_pixels)
        width, height = image_size(raw / source.path)
        if mask.shape != (height, width):
            got = f"{mask.shape[1]}x{mask.shape[0]}"
            raise BadImage(f"mask {MASKS}/{path.name} is {got}, the image {width}x{height}")
        lut = self._lut(raw)
        if mask.min() < 0 or mask.max() >= len(lut):
            span = f"{mask.min()}..{mask.max()}"
            raise BadImage(f"mask codes {span} outside the code table {CODES} (0..{len(lut) - 1})")
        present = np.flatnonzero(np.bincount(mask.ravel(), minlength=len(lut)))
        unknown = present[lut[present] < 0]
        if unknown.size:
            raise BadImage(f"mask codes {unknown.tolist()} are not in {CODES}")
        return mask

    def mask_label(self, mask_patch: np.ndarray) -> Label:
        """Multi-hot tuple of the 10 classes from a mapped mask tile, or None to drop the patch.

        fraction_c = pixels of class c / pixels of the patch. Drop when the fractions sum below
        ``label_threshold`` (mostly outside the ROI or unlabelled classes); class c is positive when
        fraction_c >= ``presence``.
        """
        total = mask_patch.size
        if total == 0:
            return None
        flat = np.asarray(mask_patch).ravel().astype(np.intp, copy=False)
        counts = np.bincount(flat, minlength=len(self.classes) + 1)[1 : len(self.classes) + 1]
        if counts.sum() / total < self.option_values["label_threshold"]:
            return None
        return tuple(int(c / total >= self.option_values["presence"]) for c in counts)


CARD = BCSS
