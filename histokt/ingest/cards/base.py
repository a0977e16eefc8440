"""What every dataset card is: the raw layout it reads, its classes, its µm/px and how it splits.

A card's ``index`` lists the raw sources (one per image, or per HDF5 row) quickly, without decoding
pixels, and checks the layout, failing fast with "verify the download". It returns a ``CardIndex``:
the sources with everything the pipeline reads about them (classes, split plan, expected counts), so a
card never changes its own attributes while indexing. ``read`` then decodes one source. Cards hold only
their options, so they pickle cleanly into worker processes.
"""

import csv
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from histokt.errors import UserError, verify_download
from histokt.ingest.decode import MAX_PIXELS, load_rgb_image
from histokt.ingest.tiling import rescale

# HistoKT's default ratios where a dataset (or an official partition) has to be cut: 80/10/10.
DEFAULT_RATIOS = {"train": 0.8, "valid": 0.1, "test": 0.1}
SPLITS = ("train", "valid", "test")

# A source's or a patch's label: a class index, a multi-hot tuple of 0/1, or None (labelled from a mask).
Label = int | tuple[int, ...] | None
# A card option's value: parsed from KEY=VALUE to the type of the option's default.
OptionValue = str | int | float | bool | None
# How each official partition becomes train/valid/test: {partition: {split: ratio}}.
SplitPlan = dict[str, dict[str, float]]


@dataclass(frozen=True)
class Source:
    """One raw image (or HDF5 row).

    path: relative to the raw dir, with '/' separators; PCam rows are ``<file>[<row>]``.
    label: class index, a tuple of 0/1 (multi-label), or None where the label comes from a mask (BCSS).
    partition: the official split this source belongs to, or "all" where the dataset has none.
    group: the leakage-safe group key (patient, case, institution or source image).
    """

    path: str
    label: Label
    partition: str
    group: str


@dataclass(frozen=True)
class CardIndex:
    """What ``Card.index`` found: the sources and everything the pipeline needs to know about them."""

    card: str  # the card's name, for messages
    sources: tuple[Source, ...]
    classes: tuple[str, ...]
    multi_label: bool
    group_rule: str
    split_plan: SplitPlan  # {official partition: {split: ratio}}; every partition of the sources has one
    expected_counts: dict[str, int]  # sources per partition in a complete download

    def count_warnings(self, sources: Sequence[Source] | None = None) -> list[str]:
        """Differences of ``sources`` (default: all indexed) from the known counts (a subset is common):
        warnings recorded in the store."""
        sources = self.sources if sources is None else sources
        out = []
        for part, want in self.expected_counts.items():
            got = sum(1 for s in sources if s.partition == part)
            if got != want:
                msg = f"{self.card}: {part} has {got} sources, a complete download has {want}"
                warnings.warn(msg, stacklevel=2)
                out.append(msg)
        return out


class Card:
    """Base class. Subclasses set the class attributes and implement ``index`` (and ``read`` if not files).

    ``classes`` and ``group_rule`` may depend on the options: a card sets them when it is made (``__init__``
    or ``check_options``), never while indexing. What depends on the raw data (classes read from it, the
    split plan and counts of the layout found) is returned in the ``CardIndex``.
    """

    name: ClassVar[str]
    classes: tuple[str, ...] = ()
    multi_label: ClassVar[bool] = False
    mpp: ClassVar[float | None] = None  # native µm/px; None = the user must pass --mpp
    mpp_source: ClassVar[str] = ""
    # The split plan and counts of a complete download with the default options (see ``make_index``).
    split_plan: ClassVar[SplitPlan] = {"all": DEFAULT_RATIOS}
    group_rule: str = "source image"
    # Known counts of a complete download, {partition: N}; a different count is a warning, not an error.
    expected_counts: ClassVar[dict[str, int]] = {}
    # Card options with their defaults; values given on the command line are parsed to the default's type.
    OPTION_DEFAULTS: ClassVar[dict[str, OptionValue]] = {}
    # Patch stride if the card's dataset uses a different overlap (BCSS); None = the command's --stride.
    default_stride: ClassVar[int | None] = None
    # Largest image decoded; the pipeline sets it from --max-pixels.
    max_pixels: int = MAX_PIXELS

    def __init__(self, **options: OptionValue) -> None:
        unknown = sorted(set(options) - set(self.OPTION_DEFAULTS))
        if unknown:
            known = ", ".join(sorted(self.OPTION_DEFAULTS)) or "none"
            raise UserError(f"card {self.name}: unknown option {unknown[0]!r} (known options: {known})")
        # The option values of this card: the defaults, overridden by the options given.
        self.option_values: dict[str, Any] = {**self.OPTION_DEFAULTS, **options}
        self.check_options()

    # -- to implement -------------------------------------------------------------------------------------
    def index(self, raw: Path) -> CardIndex:
        """List every source under ``raw`` (``make_index``); raise ``verify_download(...)`` on a wrong layout."""
        raise NotImplementedError

    def read(self, raw: Path, source: Source) -> np.ndarray | Image.Image:
        """Decode one source to an (H, W, 3) uint8 array or an RGB Pillow image; raise decode.BadImage for a
        bad file. (An image skips a full-size numpy copy: the pipeline resizes it first.)"""
        return load_rgb_image(raw / source.path, self.max_pixels)

    def read_mask(self, raw: Path, source: Source) -> np.ndarray | None:
        """Integer label mask aligned with ``read`` (BCSS), or None."""
        return None

    def rescaled_mask(self, raw: Path, source: Source, scale: float) -> np.ndarray | None:
        """``read_mask`` resized by ``scale`` like the image (nearest neighbour: labels are not blended), or None.

        A card whose original blended its masks (BCSS option mask_resize=bilinear) overrides this."""
        mask = self.read_mask(raw, source)
        return None if mask is None else rescale(mask, scale, labels=True)

    def mask_label(self, mask_patch: np.ndarray) -> Label:
        """Label of a patch from its mask tile (multi-hot tuple), or None to drop it."""
        raise NotImplementedError

    def check_options(self) -> None:
        """Validate ``self.option_values``; raise UserError naming the option."""

    # -- shared helpers -----------------------------------------------------------------------------------
    def make_index(
        self,
        sources: Iterable[Source],
        *,
        classes: Sequence[str] | None = None,
        split_plan: Mapping[str, Mapping[str, float]] | None = None,
        expected_counts: Mapping[str, int] | None = None,
    ) -> CardIndex:
        """The ``CardIndex`` of ``sources``: the card's classes, split plan and expected counts unless given."""
        plan = self.split_plan if split_plan is None else split_plan
        return CardIndex(
            card=self.name,
            sources=tuple(sources),
            classes=tuple(self.classes if classes is None else classes),
            multi_label=self.multi_label,
            group_rule=self.group_rule,
            split_plan={part: dict(ratios) for part, ratios in plan.items()},
            expected_counts=dict(self.expected_counts if expected_counts is None else expected_counts),
        )

    def describe(self) -> dict:
        """The card's identity as stored in the dataset attrs (a different card means a different dataset)."""
        return {"card": self.name, "options": dict(sorted(self.option_values.items()))}

    def options_set(self) -> dict:
        """The options that differ from their defaults."""
        return {k: v for k, v in sorted(self.option_values.items()) if v != self.OPTION_DEFAULTS[k]}

    def require_dir(self, path: Path, what: str) -> Path:
        if not path.is_dir():
            raise verify_download(self.name, path, f"expected {what} (a folder)")
        return path

    def require_file(self, path: Path, what: str) -> Path:
        if not path.is_file():
            raise verify_download(self.name, path, f"expected {what} (a file)")
        return path

    def class_folder_sources(self, raw: Path, parent: Path, suffixes, partition: str = "all") -> list[Source]:
        """One source per image in ``parent/<class>/`` for each of the card's classes (group: the image)."""
        sources = []
        for label, cls in enumerate(self.classes):
            files = image_files(parent / cls, suffixes)
            if not files:
                raise verify_download(self.name, parent / cls, f"class folder holds no {suffixes[0]} images")
            sources += [Source(rel(raw, f), label, partition, rel(raw, f)) for f in files]
        return sources

    def match_files(
        self, folder: Path, on_disk: set[str] | dict[str, str], listed: list[str], csv_name: str, suffix: str = ""
    ) -> None:
        """Check that the label CSV and the image folder match one-to-one, so that a partial download or a
        renamed file fails fast, naming the first offending file and how many there are.

        on_disk: the images found, as a set of file names or a dict {name: file name} (GlaS keys by stem).
        listed: the names in the CSV; the first missing one reported is the first in this order.
        suffix: appended to a missing name to give its expected file name (GlaS: ".bmp").
        """
        files = on_disk if isinstance(on_disk, dict) else {n: n for n in on_disk}
        missing = [n for n in listed if n not in files]
        if missing:
            detail = f"named in {csv_name} but not found ({len(missing)} missing)"
            raise verify_download(self.name, folder / f"{missing[0]}{suffix}", detail)
        unlabelled = sorted(set(files) - set(listed))
        if unlabelled:
            detail = f"has no row in {csv_name} ({len(unlabelled)} unlabelled)"
            raise verify_download(self.name, folder / files[unlabelled[0]], detail)

    def csv_rows(self, path: Path, required, hint: str = ""):
        """(line number, row) of a CSV whose header names are stripped of spaces (GlaS ships ' grade');
        a missing required column fails naming the file."""
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in required if c not in header]
            if missing:
                raise verify_download(self.name, path, f"missing columns {missing}{hint}")
            reader.fieldnames = header
            yield from enumerate(reader, start=2)

    def check_classes(self, found, where) -> None:
        """The class names found in the raw data must be exactly the card's."""
        found, want = sorted(set(found)), sorted(self.classes)
        if found != want:
            missing = sorted(set(want) - set(found))
            extra = sorted(set(found) - set(want))
            detail = "; ".join(
                s for s in (f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else "") if s
            )
            raise verify_download(self.name, where, f"classes {detail}, expected {list(self.classes)}")


def class_index(classes, name: str, card: str, where) -> int:
    """Index of a class name, or a clear error naming the unknown class and the file it came from."""
    try:
        return classes.index(name)
    except ValueError:
        raise verify_download(card, where, f"unknown class {name!r}, expected one of {list(classes)}") from None


def image_files(folder: Path, suffixes) -> list[Path]:
    """Files under ``folder`` (recursively) with one of ``suffixes`` (case-insensitive), sorted."""
    suffixes = tuple(s.lower() for s in suffixes)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def rel(raw: Path, path: Path) -> str:
    return path.relative_to(raw).as_posix()
