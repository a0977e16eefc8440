"""ADP — Atlas of Digital Pathology, Release 1 (multi-label hierarchical tissue types).

Raw layout (the raw dir is the release folder, or a folder holding it)::

    ADP V1.0 Release/
    ├── img_res_1um_bicubic/001.png_crop_16.png …   272×272 PNG, already 1 µm/px
    ├── ADP_EncodedLabels_Release1_Flat.csv         `Patch Names` + one 0/1 column per class code
    └── splits/{train,valid,test}.npy               official split lists (optional)

The split lists are read with ``allow_pickle=False``. HistoKT indexes the CSV with them
(``ADP_data.loc[inds]``), so integer arrays are taken as 0-based CSV row numbers; string arrays are
taken as patch names. Without ``splits/`` the patches are cut 80/10/10 as partition "all", grouped by
the source image (the name before ``_crop_``).
"""

import csv
from pathlib import Path, PurePosixPath

import numpy as np

from histokt.errors import UserError, verify_download
from histokt.ingest.cards.base import DEFAULT_RATIOS, Card, CardIndex, Source

RELEASE = "ADP V1.0 Release"
IMAGE_DIR = "img_res_1um_bicubic"
CSV_NAME = "ADP_EncodedLabels_Release1_Flat.csv"
NAME_COLUMN = "Patch Names"
SPLIT_NAMES = ("train", "valid", "test")

# Class codes per hierarchy level, in HistoKT's index order (src/adas/datasets/ADPDataset.py).
LEVELS = {
    "L1": ("E", "C", "H", "S", "A", "M", "N", "G", "T"),
    "L2": (
        "E", "E.M", "E.T", "C", "C.D", "C.L", "H", "H.E", "H.K", "H.Y", "S", "S.M", "S.C", "S.R",
        "A", "A.W", "A.M", "M", "N", "N.P", "N.R", "N.G", "G", "G.O", "G.N", "T",
    ),
    "L3": (
        "E", "E.M", "E.M.S", "E.M.C", "E.T", "E.T.S", "E.T.C", "C", "C.D", "C.D.I", "C.D.R", "C.L",
        "H", "H.E", "H.K", "H.Y", "S", "S.M", "S.C", "S.R", "A", "A.W", "A.M", "M",
        "N", "N.P", "N.R", "N.G", "N.G.M", "G", "G.O", "G.N", "T",
    ),
    "L3Only": (
        "E.M.S", "E.M.C", "E.T.S", "E.T.C", "C.D.I", "C.D.R", "C.L", "H.E", "H.K", "H.Y",
        "S.M", "S.C", "S.R", "A.W", "A.M", "M", "N.P", "N.R", "N.G.M", "G.O", "G.N", "T",
    ),
}  # fmt: skip


class ADP(Card):
    name = "adp"
    classes = LEVELS["L3"]
    multi_label = True
    mpp = 1.0
    mpp_source = "HistoKT (released 1 µm/px bicubic set)"
    split_plan = {s: {s: 1.0} for s in SPLIT_NAMES}
    group_rule = "source image (patch name before '_crop_')"
    expected_counts = {"train": 14134, "valid": 1767, "test": 1767}
    # Without official splits: the whole release, cut 80/10/10.
    ALL_COUNT = 17668
    OPTION_DEFAULTS = {"level": "L3"}

    def check_options(self) -> None:
        if self.option_values["level"] not in LEVELS:
            raise UserError(
                f"card adp: option level={self.option_values['level']!r}, expected one of {', '.join(LEVELS)}"
            )
        self.classes = LEVELS[self.option_values["level"]]

    def index(self, raw: Path) -> CardIndex:
        root = self._release_dir(raw)
        prefix = root.relative_to(raw).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        names, labels = self._read_csv(root / CSV_NAME)
        images = self.require_dir(root / IMAGE_DIR, "the patch images folder")
        on_disk = {p.name for p in images.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
        self.match_files(images, on_disk, names, CSV_NAME)
        official = (root / "splits").exists()
        partitions = self._partitions(root, names) if official else {n: "all" for n in names}
        sources = [Source(f"{prefix}{IMAGE_DIR}/{n}", labels[n], partitions[n], source_image(n)) for n in names]
        sources.sort(key=lambda s: s.path)
        if official:
            return self.make_index(sources)
        # without the official lists: the whole release, cut 80/10/10
        return self.make_index(sources, split_plan={"all": DEFAULT_RATIOS}, expected_counts={"all": self.ALL_COUNT})

    # -- layout --------------------------------------------------------------------------------------------
    def _release_dir(self, raw: Path) -> Path:
        """The raw dir itself, or the release folder inside it (users pass either)."""
        for root in (raw, raw / RELEASE):
            if (root / CSV_NAME).is_file():
                return root
        self.require_dir(raw, f"the ADP release '{RELEASE}'")
        raise verify_download(self.name, raw / CSV_NAME, f"expected the label CSV of '{RELEASE}' (a file)")

    def _read_csv(self, path: Path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
        """Patch names in CSV order and their 0/1 label tuples in this level's class order."""
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            columns = self._columns(path, header)
            names: list[str] = []
            labels: dict[str, tuple[int, ...]] = {}
            for line, row in enumerate(reader, start=2):
                if not any(cell.strip() for cell in row):
                    continue
                name = row[columns[0]].strip() if len(row) > columns[0] else ""
                if not name:
                    raise verify_download(self.name, path, f"line {line} has no '{NAME_COLUMN}'")
                if name in labels:
                    raise verify_download(self.name, path, f"duplicate patch name {name!r} (line {line})")
                labels[name] = tuple(self._flag(path, line, row, i, c) for i, c in zip(columns[1:], self.classes))
                names.append(name)
        if not names:
            raise verify_download(self.name, path, "label CSV has no rows")
        return names, labels

    def _columns(self, path: Path, header: list[str]) -> list[int]:
        missing = [c for c in (NAME_COLUMN, *self.classes) if c not in header]
        if missing:
            raise verify_download(self.name, path, f"missing columns {missing} (level {self.option_values['level']})")
        return [header.index(c) for c in (NAME_COLUMN, *self.classes)]

    def _flag(self, path: Path, line: int, row: list[str], col: int, code: str) -> int:
        value = row[col].strip() if col < len(row) else ""
        if value in ("0", "0.0"):
            return 0
        if value in ("1", "1.0"):
            return 1
        raise verify_download(self.name, path, f"line {line}, column {code!r}: {value!r} is not 0 or 1")

    # -- splits --------------------------------------------------------------------------------------------
    def _partitions(self, root: Path, names: list[str]) -> dict[str, str]:
        """Official partition per patch name, from the lists in splits/."""
        folder = self.require_dir(root / "splits", "the official split lists")
        out: dict[str, str] = {}
        for split in SPLIT_NAMES:
            path = self.require_file(folder / f"{split}.npy", f"the official {split} list")
            for name in self._split_names(path, names):
                if name in out:
                    raise verify_download(self.name, path, f"{name!r} is also in the {out[name]} list")
                out[name] = split
        unassigned = [n for n in names if n not in out]
        if unassigned:
            raise verify_download(
                self.name, folder, f"{unassigned[0]!r} is in no split list ({len(unassigned)} unassigned)"
            )
        return out

    def _split_names(self, path: Path, names: list[str]) -> list[str]:
        """Patch names of one split list: CSV row numbers (as HistoKT uses them) or patch names."""
        array = load_list(self.name, path)
        if array.dtype.kind in "iu":
            bad = [int(i) for i in array if not 0 <= i < len(names)]
            if bad:
                raise verify_download(self.name, path, f"row {bad[0]} is outside the CSV's {len(names)} rows")
            return [names[int(i)] for i in array]
        known = set(names)
        out = [_decode(v) for v in array]
        unknown = [n for n in out if n not in known]
        if unknown:
            raise verify_download(self.name, path, f"{unknown[0]!r} has no row in {CSV_NAME}")
        return out


def load_list(card: str, path: Path) -> np.ndarray:
    """A 1-D integer or string array from ``.npy``, never unpickling."""
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise verify_download(
                card,
                path,
                "is a pickled object array, which histokt never loads (re-save it as strings or row numbers)",
            ) from None
        raise verify_download(card, path, f"is not a readable .npy file ({exc})") from None
    except OSError as exc:
        raise verify_download(card, path, f"is not a readable .npy file ({exc})") from None
    if array.ndim != 1 or array.dtype.kind not in "iuUS":
        raise verify_download(
            card, path, f"expected a 1-D array of row numbers or patch names, got {array.dtype} {array.shape}"
        )
    return array


def _decode(value) -> str:
    text = value.decode() if isinstance(value, bytes) else str(value)
    # Lists may hold paths; the CSV holds bare patch names.
    return PurePosixPath(text.strip().replace("\\", "/")).name


def source_image(patch_name: str) -> str:
    """``001.png_crop_16.png`` -> ``001.png``: crops of one scanned image share a group."""
    head, sep, _ = patch_name.partition("_crop_")
    return head if sep else patch_name


CARD = ADP
