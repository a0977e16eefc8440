"""MHIST — colorectal polyps, hyperplastic (HP) vs sessile serrated (SSA).

Raw layout (``images.zip`` unzipped next to the CSV)::

    mhist/
    ├── images/MHIST_<aaa>.png …     224×224 PNG
    └── annotations.csv             Image Name, Majority Vote Label (HP/SSA), …, Partition (train/test)

The CSV and the images must match one-to-one. No patient IDs are published: the image is the group.
"""

from pathlib import Path

from histokt.errors import verify_download
from histokt.ingest.cards.base import Card, CardIndex, Source, class_index

CSV_NAME = "annotations.csv"
NAME, LABEL, PARTITION = "Image Name", "Majority Vote Label", "Partition"
PARTITIONS = ("train", "test")


class MHIST(Card):
    name = "mhist"
    # HistoKT's stored index (ImageFolder re-sorts the loader's [SSA, HP]).
    classes = ("HP", "SSA")
    mpp = 1.25
    mpp_source = "HistoKT (eva and THUNDER: 2.0)"
    split_plan = {"train": {"train": 0.8, "valid": 0.2}, "test": {"test": 1.0}}
    group_rule = "image (no patient IDs published)"
    expected_counts = {"train": 2175, "test": 977}

    def index(self, raw: Path) -> CardIndex:
        csv_path = self.require_file(raw / CSV_NAME, f"the MHIST label file {CSV_NAME}")
        images = raw / "images"
        if not images.is_dir() and (raw / "images.zip").is_file():
            raise verify_download(self.name, images, "expected a folder; unzip images.zip here")
        self.require_dir(images, "the MHIST images folder")
        rows = self._read_csv(csv_path)
        on_disk = {p.name for p in images.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
        self.match_files(images, on_disk, sorted(rows), CSV_NAME)
        return self.make_index(
            sorted(
                (Source(f"images/{n}", label, part, f"images/{n}") for n, (label, part) in rows.items()),
                key=lambda s: s.path,
            )
        )

    def _read_csv(self, path: Path) -> dict[str, tuple[int, str]]:
        """Image name -> (class index, partition)."""
        rows: dict[str, tuple[int, str]] = {}
        for line, row in self.csv_rows(path, (NAME, LABEL, PARTITION)):
            name = (row[NAME] or "").strip()
            if not name:
                continue
            if name in rows:
                raise verify_download(self.name, path, f"duplicate image name {name!r} (line {line})")
            label = class_index(self.classes, (row[LABEL] or "").strip(), self.name, f"{path} line {line}")
            rows[name] = (label, self._partition(path, line, row[PARTITION]))
        if not rows:
            raise verify_download(self.name, path, "label CSV has no rows")
        return rows

    def _partition(self, path: Path, line: int, value) -> str:
        part = (value or "").strip().lower()
        if part not in PARTITIONS:
            raise verify_download(self.name, path, f"line {line}: partition {value!r}, expected train or test")
        return part


CARD = MHIST
