"""Generic card: one sub-folder per class (ImageFolder layout). Requires --mpp."""

import re
from pathlib import Path

from ..errors import UserError, verify_download
from .base import Card, Source, image_files, rel

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class Folder(Card):
    name = "folder"
    mpp_source = "user (--mpp)"
    group_rule = "source image (or the 'group' regex match)"
    # group: a regex searched in the file name; its first group (or whole match) is the leakage-safe key.
    options = {"group": ""}

    def check_options(self):
        if self.opts["group"]:
            try:
                re.compile(self.opts["group"])
            except re.error as exc:
                raise UserError(f"card folder: option group={self.opts['group']!r} is not a regex ({exc})") from None

    def index(self, raw: Path) -> list[Source]:
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

    def _group(self, raw: Path, path: Path) -> str:
        if self.opts["group"]:
            m = re.search(self.opts["group"], path.name)
            if m:
                return m.group(1) if m.groups() else m.group(0)
        return rel(raw, path)


CARD = Folder
