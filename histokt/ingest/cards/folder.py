"""Generic card: one sub-folder per class (ImageFolder layout), or a flat folder whose file names carry the
class (option class_regex, e.g. the NCT-CRC-HE samples' ``ADI-AAQEFMRI.tif``). Requires --mpp."""

import re
from pathlib import Path

from histokt.errors import UserError, verify_download
from histokt.ingest.cards.base import Card, CardIndex, Source, image_files, rel

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class Folder(Card):
    name = "folder"
    mpp_source = "user (--mpp)"
    group_rule = "source image (or the 'group' regex match)"
    # group: a regex searched in the file name; its first group (or whole match) is the leakage-safe key.
    # class_regex: the images lie directly in the folder and this regex, searched in each file name, gives
    # the class (first group, or the whole match); classes are the distinct values, sorted.
    OPTION_DEFAULTS = {"group": "", "class_regex": ""}

    def check_options(self) -> None:
        for key in ("group", "class_regex"):
            if self.option_values[key]:
                try:
                    re.compile(self.option_values[key])
                except re.error as exc:
                    raise UserError(
                        f"card folder: option {key}={self.option_values[key]!r} is not a regex ({exc})"
                    ) from None

    def index(self, raw: Path) -> CardIndex:
        if self.option_values["class_regex"]:
            return self._index_flat(raw)
        self.require_dir(raw, "one sub-folder per class")
        class_dirs = sorted(p for p in raw.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise verify_download(self.name, raw, "no class sub-folders found")
        sources: list[Source] = []
        for label, folder in enumerate(class_dirs):
            files = image_files(folder, IMAGE_SUFFIXES)
            if not files:
                raise verify_download(self.name, folder, "class folder holds no images")
            sources += [Source(rel(raw, f), label, "all", self._group(raw, f)) for f in files]
        return self.make_index(sources, classes=[p.name for p in class_dirs])

    def _index_flat(self, raw: Path) -> CardIndex:
        self.require_dir(raw, "images whose file names give the class (option class_regex)")
        pattern = re.compile(self.option_values["class_regex"])
        files = sorted(p for p in raw.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise verify_download(self.name, raw, "no images directly in the folder (option class_regex is set)")
        names: dict[Path, str] = {}
        for f in files:
            m = pattern.search(f.name)
            if not m:
                raise verify_download(self.name, f, f"file name does not match class_regex {pattern.pattern!r}")
            names[f] = m.group(1) if m.groups() else m.group(0)
        classes = sorted(set(names.values()))
        sources = [Source(rel(raw, f), classes.index(c), "all", self._group(raw, f)) for f, c in names.items()]
        return self.make_index(sources, classes=classes)

    def _group(self, raw: Path, path: Path) -> str:
        if self.option_values["group"]:
            m = re.search(self.option_values["group"], path.name)
            if m:
                return m.group(1) if m.groups() else m.group(0)
        return rel(raw, path)


CARD = Folder
