"""Generic card: one sub-folder per class (ImageFolder layout), or a flat folder whose file names carry the
class (option class_regex, e.g. the NCT-CRC-HE samples' ``ADI-AAQEFMRI.tif``). Requires --mpp."""

import re
from pathlib import Path

from histokt.errors import UserError, verify_download
from histokt.ingest.cards.base import Card, Source, image_files, rel

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class Folder(Card):
    name = "folder"
    mpp_source = "user (--mpp)"
    group_rule = "source image (or the 'group' regex match)"
    # group: a regex searched in the file name; its first group (or whole match) is the leakage-safe key.
    # class_regex: the images lie directly in the folder and this regex, searched in each file name, gives
    # the class (first group, or the whole match); classes are the distinct values, sorted.
    options = {"group": "", "class_regex": ""}

    def check_options(self):
        for key in ("group", "class_regex"):
            if self.opts[key]:
                try:
                    re.compile(self.opts[key])
                except re.error as exc:
                    raise UserError(f"card folder: option {key}={self.opts[key]!r} is not a regex ({exc})") from None

    def index(self, raw: Path) -> list[Source]:
        if self.opts["class_regex"]:
            return self._index_flat(raw)
        self.require_dir(raw, "one sub-folder per class")
        class_dirs = sorted(p for p in raw.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise verify_download(self.name, raw, "no class sub-folders found")
        self.classes = tuple(p.name for p in class_dirs)
        sources = []
        for label, folder in enumerate(class_dirs):
            files = image_files(folder, IMAGE_SUFFIXES)
            if not files:
                raise verify_download(self.name, folder, "class folder holds no images")
            sources += [Source(rel(raw, f), label, "all", self._group(raw, f)) for f in files]
        return sources

    def _index_flat(self, raw: Path) -> list[Source]:
        self.require_dir(raw, "images whose file names give the class (option class_regex)")
        pattern = re.compile(self.opts["class_regex"])
        files = sorted(p for p in raw.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise verify_download(self.name, raw, "no images directly in the folder (option class_regex is set)")
        names = {}
        for f in files:
            m = pattern.search(f.name)
            if not m:
                raise verify_download(self.name, f, f"file name does not match class_regex {pattern.pattern!r}")
            names[f] = m.group(1) if m.groups() else m.group(0)
        self.classes = tuple(sorted(set(names.values())))
        return [Source(rel(raw, f), self.classes.index(c), "all", self._group(raw, f)) for f, c in names.items()]

    def _group(self, raw: Path, path: Path) -> str:
        if self.opts["group"]:
            m = re.search(self.opts["group"], path.name)
            if m:
                return m.group(1) if m.groups() else m.group(0)
        return rel(raw, path)


CARD = Folder
