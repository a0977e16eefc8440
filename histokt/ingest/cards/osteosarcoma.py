"""Osteosarcoma (UT Southwestern / UT Dallas, TCIA): 1,144 tiles of 1024x1024 at 10x, four CSV classes.

Raw layout (TCIA collection "Osteosarcoma-Tumor-Assessment", doi 10.7937/tcia.2019.bvhjhdas)::

    Osteosarcoma-UT/
    ├── Training-Set-1/set1/Case-3-A10-17206-19249.jpg …     nested folders, depth may vary
    ├── Training-Set-2/set9/Case-48-P5-C21-35299-19753.jpg …
    ├── Training-Set-2/set12/P9-B7-8325-33733.jpg …
    └── ML_Features_1144.csv     columns include `image.name` and `classification`

The CSV names its tiles with spaces where the files use hyphens ("Case 3 A10-17206-19249",
"Case 48 - P5 C21-35299-19753", "P9 B7-8325-33733"). HistoKT's rule resolves them: spaces -> hyphens,
"---" -> "-", then ".jpg". The whole tree is walked for ``*.jpg``; every CSV row must resolve to exactly
one file and every file must have a row.
"""

import csv
import re
from collections import defaultdict
from pathlib import Path

from histokt.errors import verify_download
from histokt.ingest.cards.base import Card, CardIndex, Source, class_index, image_files, rel

CSV_NAME = "ML_Features_1144.csv"
NAME_COLUMN = "image.name"
CLASS_COLUMN = "classification"
# The tile's case: "Case-<n>" for three of the four patients; the fourth (P9) has no "Case-" prefix, so
# its own "P<n>" token is the case too (otherwise its 212 tiles would be 212 groups spread over all splits).
CASE_RE = re.compile(r"^(Case-\d+|P\d+)-")
# How many unlabelled files an error message lists.
SHOW = 3


def file_name(csv_name: str) -> str:
    """The tile file a CSV ``image.name`` refers to (HistoKT's rule)."""
    return csv_name.strip().replace(" ", "-").replace("---", "-") + ".jpg"


def case_of(raw: Path, path: Path) -> str:
    """Leakage-safe group: the case prefix of the file name, else the file itself."""
    m = CASE_RE.match(path.name)
    return m.group(1) if m else rel(raw, path)


class Osteosarcoma(Card):
    name = "os"
    classes = ("Non-Tumor", "Viable", "Non-Viable-Tumor", "viable: non-viable")
    mpp = 1.0
    mpp_source = "HistoKT (10x tiles)"
    group_rule = "case (Case-<n> or P<n> file-name prefix; else the file)"
    expected_counts = {"all": 1144}

    def index(self, raw: Path) -> CardIndex:
        self.require_dir(raw, "the Osteosarcoma-UT folder")
        csv_path = self.require_file(raw / CSV_NAME, "the label table")
        by_name = self._files_by_name(raw)
        rows = self._read_rows(csv_path)
        sources: list[Source] = []
        used: dict[Path, int] = {}
        for line, name, cls in rows:
            path = self._resolve(csv_path, line, name, by_name)
            if path in used:
                raise verify_download(self.name, csv_path, f"rows {used[path]} and {line} both name {rel(raw, path)}")
            used[path] = line
            label = class_index(self.classes, cls, self.name, f"{csv_path} (row {line}, {name!r})")
            sources.append(Source(rel(raw, path), label, "all", case_of(raw, path)))
        self._check_all_labelled(raw, csv_path, by_name, used)
        return self.make_index(sorted(sources, key=lambda s: s.path))

    # -- helpers ------------------------------------------------------------------------------------------
    def _files_by_name(self, raw: Path) -> dict[str, list[Path]]:
        """Every .jpg under ``raw`` by file name; a name may occur in several folders (an error if used)."""
        by_name = defaultdict(list)
        for path in image_files(raw, (".jpg",)):
            by_name[path.name].append(path)
        return by_name

    def _read_rows(self, csv_path: Path) -> list[tuple[int, str, str]]:
        """(line number, image.name, classification) for every data row."""
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in (NAME_COLUMN, CLASS_COLUMN) if c not in header]
            if missing:
                raise verify_download(self.name, csv_path, f"missing column(s) {missing}, found {header[:6]}")
            name_col, class_col = header.index(NAME_COLUMN), header.index(CLASS_COLUMN)
            rows = []
            for line, row in enumerate(reader, start=2):
                if not any(cell.strip() for cell in row):
                    continue  # a trailing blank line
                if len(row) < len(header) or not row[name_col].strip():
                    detail = f"row {line} is short or has an empty {NAME_COLUMN}"
                    raise verify_download(self.name, csv_path, detail)
                rows.append((line, row[name_col].strip(), row[class_col].strip()))
        if not rows:
            raise verify_download(self.name, csv_path, "no data rows")
        return rows

    def _resolve(self, csv_path: Path, line: int, name: str, by_name: dict[str, list[Path]]) -> Path:
        want = file_name(name)
        found = by_name.get(want, [])
        if not found:
            raise verify_download(
                self.name, csv_path, f"row {line}: {NAME_COLUMN} {name!r} -> {want!r}, but no such .jpg was found"
            )
        if len(found) > 1:
            paths = ", ".join(str(p) for p in found)
            detail = f"row {line}: {NAME_COLUMN} {name!r} -> {want!r} matches {len(found)} files: {paths}"
            raise verify_download(self.name, csv_path, detail)
        return found[0]

    def _check_all_labelled(self, raw, csv_path, by_name, used) -> None:
        unlabelled = sorted(rel(raw, p) for paths in by_name.values() for p in paths if p not in used)
        if unlabelled:
            shown = ", ".join(unlabelled[:SHOW]) + (", …" if len(unlabelled) > SHOW else "")
            raise verify_download(
                self.name, raw, f"{len(unlabelled)} .jpg file(s) have no row in {csv_path.name}: {shown}"
            )


CARD = Osteosarcoma
