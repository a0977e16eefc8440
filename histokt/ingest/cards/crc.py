"""CRC — Kather NCT-CRC-HE colorectal tissue classes (zenodo 1214456).

Raw layout (the three zips unzipped side by side)::

    <raw>/
    ├── NCT-CRC-HE-100K-NONORM/{ADI,BACK,DEB,LYM,MUC,MUS,NORM,STR,TUM}/*.tif   option variant=NONORM (default)
    ├── NCT-CRC-HE-100K/{…same classes…}/*.tif                                option variant=NORM (Macenko)
    └── CRC-VAL-HE-7K/{…same classes…}/*.tif                                  the patient-disjoint test set

Options:
- ``classes``: 7 (HistoKT: BACK and DEB dropped; ADI, LYM, MUC, MUS, NORM, STR, TUM) or 9 (alphabetical).
- ``test``: "7k" (100K -> 80/20 train/valid, 7K -> test; the 7K is patient-disjoint), "holdout"
  (HistoKT's script: 100K -> 80/10/10; the 7K is ignored and may be absent) or "paper" (what the
  paper's runs trained on, the archive CRC_transformed_2000_per_class_with_valid_test: per class, k train,
  k/8 valid and k/8 test tiles, all from the 100K; the 7K is ignored and may be absent; needs per_class).
- ``per_class``: 0 = every image; k = the first k per class of the 100K after a seed-42 shuffle of the
  sorted list, the way HistoKT cut its per-class archives (it cut them after splitting; here before).
  With test=paper, per class the first k + 2 * round(k / 8) tiles of that shuffle: the first k are the
  official partition "train", the next round(k / 8) "valid", the next round(k / 8) "test" (each kept
  whole: the counts are exact per class, under either --split-rule). per_class=2000 gives HistoKT's
  2000 / 250 / 250 per class (14,000 / 1,750 / 1,750 with 7 classes). HistoKT drew the three from its
  filtered patches; here they are drawn from the tiles, so a tile failing the low-contrast filter leaves
  its split one short (the store's counts say so).
"""

import random
from pathlib import Path

from histokt.errors import UserError, verify_download
from histokt.ingest.cards.base import DEFAULT_RATIOS, Card, CardIndex, Label, Source

ALL_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
HISTOKT_CLASSES = ("ADI", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
TRAIN_DIRS = {"NONORM": "NCT-CRC-HE-100K-NONORM", "NORM": "NCT-CRC-HE-100K"}
TEST_DIR = "CRC-VAL-HE-7K"
SUFFIXES = (".tif", ".tiff")
# Files in a complete download, per number of classes kept. The 7K per-class counts are not verified,
# so the 7K count is only checked with all 9 classes.
COUNT_100K = {9: 100_000, 7: 77_922}
COUNT_7K = {9: 7_180}
SEED = 42
TESTS = ("7k", "holdout", "paper")
# test=paper: the official partitions the subset is cut into, and their (whole) splits
PAPER_PLAN = {"train": {"train": 1.0}, "valid": {"valid": 1.0}, "test": {"test": 1.0}}


class CRC(Card):
    name = "crc"
    classes: tuple[str, ...] = HISTOKT_CLASSES
    mpp = 0.5
    mpp_source = "HistoKT, eva and THUNDER"
    split_plan = {"100k": {"train": 0.8, "valid": 0.2}, "7k": {"test": 1.0}}
    group_rule = "image (no patient IDs in the 100K; the 7K is patient-disjoint from it)"
    expected_counts = {"100k": COUNT_100K[7]}
    OPTION_DEFAULTS = {"variant": "NONORM", "classes": 7, "test": "7k", "per_class": 0}

    def __init__(self, **options):
        super().__init__(**options)
        self.classes = HISTOKT_CLASSES if self.option_values["classes"] == 7 else ALL_CLASSES

    def check_options(self) -> None:
        # Case-insensitive choices, stored normalized so describe() does not tell "norm" from "NORM".
        self.option_values["variant"] = str(self.option_values["variant"]).upper()
        self.option_values["test"] = str(self.option_values["test"]).lower()
        checks = (
            ("variant", self.option_values["variant"] in TRAIN_DIRS, "NONORM or NORM"),
            ("classes", self.option_values["classes"] in (7, 9), "7 or 9"),
            ("test", self.option_values["test"] in TESTS, "one of 7k, holdout, paper"),
            (
                "per_class",
                isinstance(self.option_values["per_class"], int) and self.option_values["per_class"] >= 0,
                "an integer >= 0",
            ),
        )
        for key, ok, expected in checks:
            if not ok:
                raise UserError(f"card crc: option {key}={self.option_values[key]!r}, expected {expected}")
        if self.option_values["test"] == "paper" and not self.option_values["per_class"]:
            raise UserError(
                "card crc: option test=paper needs per_class=k (k train, k/8 valid, k/8 test per class; "
                "HistoKT: per_class=2000)"
            )

    def index(self, raw: Path) -> CardIndex:
        self.require_dir(raw, "the folder holding the unzipped NCT-CRC-HE folders")
        sources = self._subset(self._folder(raw, self._train_dir(raw), "100k"))
        if self.option_values["test"] == "7k":
            sources += self._folder(raw, raw / TEST_DIR, "7k")
        # test=holdout: the 100K is cut 80/10/10 (HistoKT's script); test=paper: the subset's partitions whole;
        # the 7K is not used by either
        plans = {"7k": self.split_plan, "holdout": {"100k": DEFAULT_RATIOS}, "paper": PAPER_PLAN}
        plan = plans[self.option_values["test"]]
        return self.make_index(sorted(sources, key=lambda s: s.path), split_plan=plan, expected_counts=self._expected())

    def _train_dir(self, raw: Path) -> Path:
        variant = self.option_values["variant"]
        folder = raw / TRAIN_DIRS[variant]
        if not folder.is_dir():
            other = next(v for v in TRAIN_DIRS if v != variant)
            hint = f"; found {TRAIN_DIRS[other]}: pass variant={other}" if (raw / TRAIN_DIRS[other]).is_dir() else ""
            raise verify_download(self.name, folder, f"expected the variant={variant} training set (a folder){hint}")
        return folder

    def _folder(self, raw: Path, folder: Path, partition: str) -> list[Source]:
        """Sources of the kept classes under one NCT folder; every kept class folder must hold images."""
        if partition == "7k" and not folder.is_dir():
            raise verify_download(self.name, folder, "expected the 7K test set (a folder), or pass test=holdout")
        self.require_dir(folder, "the training set")
        found = {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
        unexpected = sorted(found - set(ALL_CLASSES))
        if unexpected:
            expected = f"unexpected class folder, expected {list(ALL_CLASSES)}"
            raise verify_download(self.name, folder / unexpected[0], expected)
        missing = [c for c in self.classes if c not in found]
        if missing:
            raise verify_download(self.name, folder / missing[0], "missing class folder")
        return self.class_folder_sources(raw, folder, SUFFIXES, partition)

    def holdout_per_class(self) -> int:
        """test=paper: valid (and test) tiles per class, round(per_class / 8) (2000 -> 250), at least 1."""
        return max(1, round(self.option_values["per_class"] / 8))

    def _subset(self, sources: list[Source]) -> list[Source]:
        """HistoKT's per-class archive: one seeded shuffle of the sorted list, then the first k per class;
        with test=paper, the first k + 2 * holdout per class, cut into partitions train / valid / test."""
        k = self.option_values["per_class"]
        if not k:
            return sources
        paper = self.option_values["test"] == "paper"
        cuts = [("train", k), ("valid", self.holdout_per_class()), ("test", self.holdout_per_class())]
        want = sum(n for _, n in cuts) if paper else k
        shuffled = sorted(sources, key=lambda s: s.path)
        random.Random(SEED).shuffle(shuffled)
        kept: dict[Label, list[Source]] = {i: [] for i in range(len(self.classes))}
        for s in shuffled:
            if len(kept[s.label]) < want:
                kept[s.label].append(s)
        for label, chosen in enumerate(kept.values()):
            if len(chosen) < want:
                h = self.holdout_per_class()
                need = f" with test=paper needs {k} + 2 x {h} = {want} per class" if paper else ""
                raise UserError(
                    f"card crc: option per_class={k}{need}, but class {self.classes[label]} has only "
                    f"{len(chosen)} images"
                )
        if not paper:
            return [s for chosen in kept.values() for s in chosen]
        out = []
        for chosen in kept.values():
            start = 0
            for part, n in cuts:
                out += [Source(s.path, s.label, part, s.group) for s in chosen[start : start + n]]
                start += n
        return out

    def _expected(self) -> dict[str, int]:
        n = len(self.classes)
        if self.option_values["test"] == "paper":
            holdout = self.holdout_per_class() * n
            return {"train": self.option_values["per_class"] * n, "valid": holdout, "test": holdout}
        out = {"100k": self.option_values["per_class"] * n if self.option_values["per_class"] else COUNT_100K[n]}
        if self.option_values["test"] == "7k" and n in COUNT_7K:
            out["7k"] = COUNT_7K[n]
        return out


CARD = CRC
