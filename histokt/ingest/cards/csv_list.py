"""Generic card: a CSV listing images and their labels. Requires --mpp.

Raw layout (``raw`` is the folder the CSV's paths are relative to)::

    <raw>/
    ├── labels.csv          path,label[,split][,group]   (option csv; column names are options too)
    └── <any tree of images named by the CSV>

Classes are the distinct label strings, sorted (numerically where every label is an integer). Without a
split column every row is in partition "all" (80/10/10 by group); with one, each row's value
(train/valid/test) is its split. The group is the source image unless option group_column names a column
(patient, case, slide, ...).
"""

import csv
import posixpath
from pathlib import Path

from histokt.errors import UserError, verify_download
from histokt.ingest.cards.base import DEFAULT_RATIOS, SPLITS, Card, CardIndex, Source

# Delimiters that cannot be typed as one character on a command line.
DELIMITER_NAMES = {"\\t": "\t", "tab": "\t", "comma": ",", "semicolon": ";", "space": " ", "pipe": "|"}
SHOWN = 5  # how many offending rows an error lists


class CsvList(Card):
    name = "csv"
    mpp = None
    mpp_source = "user (--mpp)"
    group_rule = "source image (or option group_column)"
    OPTION_DEFAULTS = {
        "csv": "labels.csv",  # relative to raw, or absolute
        "path_column": "path",  # image path relative to raw
        "label_column": "label",
        "split_column": "",  # "" = no official split; else values train/valid/test
        "group_column": "",  # "" = the source image is its own group
        "delimiter": ",",  # one character, or tab/\t/semicolon/...
    }

    def check_options(self) -> None:
        delim = DELIMITER_NAMES.get(self.option_values["delimiter"], self.option_values["delimiter"])
        if len(delim) != 1:
            raise UserError(
                f"card csv: option delimiter={self.option_values['delimiter']!r} must be one character"
                f" (or one of {', '.join(DELIMITER_NAMES)})"
            )
        self.delimiter = delim
        for key in ("path_column", "label_column"):
            if not self.option_values[key].strip():
                raise UserError(f"card csv: option {key} must name a column")
        if self.option_values["group_column"]:
            self.group_rule = f"column {self.option_values['group_column']!r}"

    def index(self, raw: Path) -> CardIndex:
        self.require_dir(raw, "the folder the CSV's image paths are relative to")
        csv_path = Path(self.option_values["csv"]).expanduser()
        csv_path = csv_path if csv_path.is_absolute() else raw / csv_path
        self.require_file(csv_path, "a CSV of image paths and labels (option csv)")
        rows = self._read_rows(csv_path)
        paths = self._check_paths(raw, csv_path, rows)
        classes = _sorted_labels({r["label"] for r in rows})
        parts = [r["split"].lower() if self.option_values["split_column"] else "all" for r in rows]
        plan = (
            {p: {p: 1.0} for p in SPLITS if p in parts}
            if self.option_values["split_column"]
            else {"all": DEFAULT_RATIOS}
        )
        sources = [
            Source(path, classes.index(r["label"]), part, r.get("group") or path)
            for path, r, part in zip(paths, rows, parts)
        ]
        return self.make_index(sorted(sources, key=lambda s: s.path), classes=classes, split_plan=plan)

    # -- reading the CSV ----------------------------------------------------------------------------------
    def _columns(self) -> dict[str, str]:
        """Role -> column name for each configured column."""
        roles = {"path": "path_column", "label": "label_column", "split": "split_column", "group": "group_column"}
        return {role: self.option_values[opt].strip() for role, opt in roles.items() if self.option_values[opt].strip()}

    def _read_rows(self, csv_path: Path) -> list[dict]:
        """One dict per data row with the roles as keys, values stripped; ``line`` is the CSV line number."""
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=self.delimiter)
            header = [h.strip() for h in next(reader, [])]
            cols = self._columns()
            missing = [c for c in cols.values() if c not in header]
            if missing:
                raise verify_download(self.name, csv_path, f"missing column(s) {missing}; the header is {header}")
            where = {role: header.index(c) for role, c in cols.items()}
            rows = []
            for values in reader:
                if not any(v.strip() for v in values):
                    continue  # blank line
                row = {role: values[i].strip() if i < len(values) else "" for role, i in where.items()}
                rows.append({**row, "line": reader.line_num})  # physical line, right even after quoted newlines
        if not rows:
            raise verify_download(self.name, csv_path, "no data rows")
        self._check_values(csv_path, rows)
        return rows

    def _check_values(self, csv_path: Path, rows: list[dict]) -> None:
        for role in self._columns():
            empty = [r["line"] for r in rows if not r[role]]
            if empty:
                col = self._columns()[role]
                raise verify_download(
                    self.name, csv_path, f"empty {col!r} on line(s) {_first(empty)} ({len(empty)} rows)"
                )
        if "split" in self._columns():
            bad = [r for r in rows if r["split"].lower() not in SPLITS]
            if bad:
                raise verify_download(
                    self.name,
                    csv_path,
                    f"unknown split value {bad[0]['split']!r} on line {bad[0]['line']}, expected one of {list(SPLITS)}",
                )

    def _check_paths(self, raw: Path, csv_path: Path, rows: list[dict]) -> list[str]:
        """Normalized raw-relative paths: every file exists and is listed once."""
        paths = [self._relative(raw, csv_path, r) for r in rows]
        first_line: dict[str, int] = {}
        for path, r in zip(paths, rows):
            if path in first_line:
                raise verify_download(
                    self.name, csv_path, f"duplicate path {path!r} on lines {first_line[path]} and {r['line']}"
                )
            first_line[path] = r["line"]
        missing = [p for p in paths if not (raw / p).is_file()]
        if missing:
            raise verify_download(
                self.name, csv_path, f"{len(missing)} listed file(s) not found under {raw}: {_first(missing)}"
            )
        return paths

    def _relative(self, raw: Path, csv_path: Path, row: dict) -> str:
        path = row["path"]
        if Path(path).is_absolute():
            try:
                path = Path(path).relative_to(raw).as_posix()
            except ValueError:
                path = ".."  # reported below as outside raw
        norm = posixpath.normpath(path)
        if norm == ".." or norm.startswith("../"):
            raise verify_download(
                self.name, csv_path, f"line {row['line']}: path {row['path']!r} is outside the raw folder {raw}"
            )
        return norm


def _sorted_labels(labels: set[str]) -> tuple[str, ...]:
    """Sorted label strings; numerically when all are integers, so "2" comes before "10"."""
    try:
        return tuple(sorted(labels, key=int))
    except ValueError:
        return tuple(sorted(labels))


def _first(items) -> str:
    items = list(items)
    shown = ", ".join(repr(i) if isinstance(i, str) else str(i) for i in items[:SHOWN])
    return shown + (", ..." if len(items) > SHOWN else "")


CARD = CsvList
