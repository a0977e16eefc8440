"""Nothing shipped in the repository sends its reader outside it: the reference pages and sample data beside the
checkout (``../shared/...``) are not part of an install, so histokt/, jobs/, slurm/ and containers/ never name them.
Reference material is cited as docs/ pages (``docs/method.md §3``); a spec's raw paths are relative to --raw-root."""

import re

import pytest

from tests.conftest import ROOT

FOLDERS = ("histokt", "jobs", "slurm", "containers")
OUTSIDE = re.compile(r"\.\./shared|shared/(reference|data|tools)")


def offending_lines(folder):
    for path in sorted(p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary files (images, compiled) hold no prose
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                yield f"{path.relative_to(ROOT)}:{number}: {line.strip()}"


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_path_leaves_the_repository(folder):
    found = list(offending_lines(folder))
    assert not found, "these lines send the reader outside the repository (cite docs/ instead):\n" + "\n".join(found)


def test_the_pattern_catches_what_it_is_for():
    for line in ("see ../shared/reference/method.md §2", "raw = 'shared/data/crc'", "shared/tools/x.py"):
        assert OUTSIDE.search(line), line
    for line in ("jobs/demo-shared-data.toml", "docs/method.md §3", "a shared store", "shared memory"):
        assert not OUTSIDE.search(line), line
