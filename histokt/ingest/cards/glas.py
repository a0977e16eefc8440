"""GlaS — Warwick QU colon gland images (MICCAI 2015), benign vs malignant.

Raw layout (the raw dir is the release folder, or a folder holding it, as unzipped)::

    [warwick_qu_dataset_released_2016_07_08/]Warwick QU Dataset (Released 2016_07_08)/
    ├── train_<n>.bmp, testA_<n>.bmp, testB_<n>.bmp   variable size (mostly 775×522)
    ├── <same>_anno.bmp                                gland masks (not used)
    └── Grade.csv                                      name, patient ID, grade (GlaS), grade (Sirinukunwattana…)

``Grade.csv`` has leading spaces in its headers and values (`` patient ID``, `` benign``): both are
stripped. Partitions come from the name prefix (HistoKT used CSV row positions instead).
"""

import re
from pathlib import Path

from histokt.errors import verify_download
from histokt.ingest.cards.base import Card, CardIndex, Source, class_index

RELEASE = "Warwick QU Dataset (Released 2016_07_08)"
ZIP_FOLDER = "warwick_qu_dataset_released_2016_07_08"
CSV_NAME = "Grade.csv"
NAME, PATIENT, GRADE = "name", "patient ID", "grade (GlaS)"
NAME_RE = re.compile(r"^(train|testA|testB)_\d+$")


class GlaS(Card):
    name = "glas"
    classes = ("benign", "malignant")
    mpp = 0.62005
    mpp_source = "HistoKT"
    # testA is the larger official test set: it becomes valid, testB the test (as HistoKT).
    split_plan = {"train": {"train": 1.0}, "testA": {"valid": 1.0}, "testB": {"test": 1.0}}
    group_rule = "patient ID (Grade.csv)"
    expected_counts = {"train": 85, "testA": 60, "testB": 20}

    def index(self, raw: Path) -> CardIndex:
        root = self._release_dir(raw)
        prefix = root.relative_to(raw).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        rows = self._read_csv(root / CSV_NAME)
        # Image name -> file name; the gland masks (<name>_anno.bmp) have no row.
        files = {
            p.stem: p.name
            for p in root.iterdir()
            if p.is_file() and p.suffix.lower() == ".bmp" and not p.stem.endswith("_anno")
        }
        self.match_files(root, files, sorted(rows), CSV_NAME, suffix=".bmp")
        # the partition is the name's prefix (train, testA, testB), checked by NAME_RE in _read_csv
        sources = [
            Source(prefix + files[name], label, name.split("_", 1)[0], patient)
            for name, (label, patient) in rows.items()
        ]
        return self.make_index(sorted(sources, key=lambda s: s.path))

    def _release_dir(self, raw: Path) -> Path:
        """The release folder: the raw dir itself or one or two levels below (as the zip unpacks)."""
        for root in (raw, raw / RELEASE, raw / ZIP_FOLDER / RELEASE):
            if (root / CSV_NAME).is_file():
                return root
        self.require_dir(raw, f"the GlaS release '{RELEASE}'")
        raise verify_download(self.name, raw / CSV_NAME, f"expected the grade file of '{RELEASE}' (a file)")

    def _read_csv(self, path: Path) -> dict[str, tuple[int, str]]:
        """Image name -> (class index, patient ID), with headers and values stripped."""
        rows: dict[str, tuple[int, str]] = {}
        for line, row in self.csv_rows(path, (NAME, PATIENT, GRADE), " (after stripping spaces)"):
            name = (row[NAME] or "").strip()
            if not name:
                continue
            where = f"{path} line {line}"
            if not NAME_RE.match(name):
                expected = "expected train_<n>, testA_<n> or testB_<n>"
                raise verify_download(self.name, where, f"name {name!r}, {expected}")
            if name in rows:
                raise verify_download(self.name, where, f"duplicate image name {name!r}")
            patient = (row[PATIENT] or "").strip()
            if not patient:
                raise verify_download(self.name, where, f"{name!r} has no patient ID")
            rows[name] = (class_index(self.classes, (row[GRADE] or "").strip(), self.name, where), patient)
        if not rows:
            raise verify_download(self.name, path, "grade CSV has no rows")
        return rows


CARD = GlaS
