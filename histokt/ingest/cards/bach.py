"""BACH (ICIAR 2018 Grand Challenge), microscopy part: 400 labelled 2048x1536 TIFF photos, 100 per class.

Raw layout (``raw`` is the extracted challenge folder, or its ``Photos/`` folder directly)::

    ICIAR2018_BACH_Challenge/
    ├── Photos/
    │   ├── Benign/b001.tif …       one folder per class; the folder name is the label
    │   ├── InSitu/is001.tif …
    │   ├── Invasive/iv001.tif …
    │   ├── Normal/n001.tif …
    │   └── microscopy_ground_truth.csv   ignored (the folders already carry the labels)
    └── WSI/                        ignored (the whole-slide part of the challenge)

The official test set has hidden labels, so every split comes from the labelled photos (partition "all",
HistoKT's 40/10/50). Patients are not in the download; option ``patients`` names a CSV with columns
``image,patient`` (e.g. converted from the spreadsheet linked from the challenge site) to group by patient.
"""

import csv
from pathlib import Path

from histokt.errors import UserError, verify_download
from histokt.ingest.cards.base import Card, CardIndex, Source, rel

CLASSES = ("Benign", "InSitu", "Invasive", "Normal")
SUFFIXES = (".tif", ".tiff")


class Bach(Card):
    name = "bach"
    classes = CLASSES  # HistoKT's ImageFolder order (alphabetical)
    mpp = 0.42
    mpp_source = "HistoKT, eva bach.md and THUNDER (eva index: 0.5)"
    # HistoKT's last (overriding) call cut 40/10/50; the published numbers fit it (docs/method.md §1).
    split_plan = {"all": {"train": 0.4, "valid": 0.1, "test": 0.5}}
    group_rule = "source image, or patient with option patients=<csv>"
    expected_counts = {"all": 400}
    # patients: CSV (relative to raw, or absolute) with columns image,patient; "" = group by source image.
    OPTION_DEFAULTS = {"patients": ""}

    def check_options(self) -> None:
        self.group_rule = "patient (option patients)" if self.option_values["patients"] else "source image"

    def index(self, raw: Path) -> CardIndex:
        photos = self._photos_dir(raw)
        class_dirs = {p.name: p for p in photos.iterdir() if p.is_dir() and not p.name.startswith(".")}
        self.check_classes(class_dirs, photos)
        sources = self.class_folder_sources(raw, photos, SUFFIXES)
        if self.option_values["patients"]:
            sources = self._group_by_patient(raw, photos, sources)
        return self.make_index(sorted(sources, key=lambda s: s.path))

    def _photos_dir(self, raw: Path) -> Path:
        """Accept the challenge root (holding Photos/) or Photos/ itself."""
        self.require_dir(raw, "ICIAR2018_BACH_Challenge/ or its Photos/ folder")
        if (raw / "Photos").is_dir():
            return raw / "Photos"
        if any((raw / c).is_dir() for c in CLASSES):
            return raw
        raise verify_download(self.name, raw, "expected a Photos/ folder with Benign, InSitu, Invasive, Normal")

    # -- patient grouping ---------------------------------------------------------------------------------
    def _group_by_patient(self, raw: Path, photos: Path, sources: list[Source]) -> list[Source]:
        csv_path = Path(self.option_values["patients"])
        csv_path = csv_path if csv_path.is_absolute() else raw / csv_path
        if not csv_path.is_file():
            raise UserError(f"bach: option patients={self.option_values['patients']!r}: {csv_path} is not a file")
        patient_of = self._resolve_rows(csv_path, _read_patient_rows(csv_path), raw, photos, sources)
        # Images missing from the CSV keep their own image as group (they can leak only with themselves).
        return [
            Source(s.path, s.label, s.partition, f"patient:{patient_of[s.path]}") if s.path in patient_of else s
            for s in sources
        ]

    def _resolve_rows(self, csv_path, rows, raw: Path, photos: Path, sources) -> dict[str, str]:
        """Map each CSV ``image`` (file name, stem, or path under Photos/ or raw) to a source path."""
        lookup: dict[str, list[str]] = {}
        for s in sources:
            p = raw / s.path
            for key in {p.name, p.stem, rel(photos, p), rel(raw, p)}:
                lookup.setdefault(key, []).append(s.path)
        out: dict[str, str] = {}
        for line, image, patient in rows:
            hits = sorted(set(lookup.get(image, ())))
            if not hits:
                raise verify_download(self.name, csv_path, f"line {line}: image {image!r} is not in {photos}")
            if len(hits) > 1:
                raise verify_download(
                    self.name, csv_path, f"line {line}: image {image!r} is ambiguous ({', '.join(hits)}); use the path"
                )
            if out.get(hits[0], patient) != patient:
                raise verify_download(
                    self.name,
                    csv_path,
                    f"line {line}: image {image!r} is given two patients ({out[hits[0]]!r} and {patient!r})",
                )
            out[hits[0]] = patient
        return out


def _read_patient_rows(csv_path: Path) -> list[tuple[int, str, str]]:
    """(line number, image, patient) per row; headers and values stripped of spaces."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        missing = [c for c in ("image", "patient") if c not in header]
        if missing:
            raise verify_download("bach", csv_path, f"missing column(s) {missing}; header is {header}")
        i_img, i_pat = header.index("image"), header.index("patient")
        rows = []
        for line, row in enumerate(reader, start=2):
            if not any(v.strip() for v in row):
                continue  # blank line
            image = row[i_img].strip() if i_img < len(row) else ""
            patient = row[i_pat].strip() if i_pat < len(row) else ""
            if not image or not patient:
                raise verify_download("bach", csv_path, f"line {line}: empty image or patient")
            rows.append((line, image, patient))
    return rows


CARD = Bach
