"""AJ-Lymph (Janowczyk deep-learning tutorial, use case 7): 374 lymphoma H&E TIFFs, ≈1388x1040 at 40x.

Raw layout (``raw`` is the folder holding the three class folders)::

    AJ-Lymph/
    ├── CLL/*.tif     chronic lymphocytic leukemia
    ├── FL/*.tif      follicular lymphoma
    └── MCL/*.tif     mantle cell lymphoma

No official split and no patient IDs are published, so the source image is the group (80/10/10).
"""

from pathlib import Path

from histokt.ingest.cards.base import Card, CardIndex

SUFFIXES = (".tif", ".tiff")


class AJLymph(Card):
    name = "ajlymph"
    classes = ("CLL", "FL", "MCL")  # HistoKT's ImageFolder order (alphabetical)
    mpp = 0.25
    mpp_source = "HistoKT (40x; no other source)"
    group_rule = "source image"
    expected_counts = {"all": 374}

    def index(self, raw: Path) -> CardIndex:
        self.require_dir(raw, "AJ-Lymph/ with CLL, FL, MCL class folders")
        class_dirs = {p.name: p for p in raw.iterdir() if p.is_dir() and not p.name.startswith(".")}
        self.check_classes(class_dirs, raw)
        return self.make_index(sorted(self.class_folder_sources(raw, raw, SUFFIXES), key=lambda s: s.path))


CARD = AJLymph
