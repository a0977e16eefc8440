import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """../shared/data (real histology images), or a skip saying why."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data test: {SHARED_DATA} is absent (it ships beside the repository in CI)")
    return SHARED_DATA


def histokt_cmd(*args):
    """The CLI as a subprocess argv, using the interpreter running the tests."""
    return [sys.executable, "-m", "histokt", *map(str, args)]


@pytest.fixture
def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Tmpfs:
    """A small file system of its own (a tmpfs, root only), to fill on purpose: ``mount(mib)`` mounts it at
    ``path`` and returns that folder (or skips the test where mounting is not permitted), ``grow(mib)``
    remounts it larger, as a user frees space."""

    def __init__(self, path: Path):
        self.path, self.mounted = path, False

    def mount(self, mib: int) -> Path:
        self.path.mkdir(exist_ok=True)
        command = ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(self.path)]
        r = subprocess.run(command, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.strip() or r.returncode}")
        self.mounted = True
        return self.path

    def grow(self, mib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={mib}m", str(self.path)], check=True)


@pytest.fixture
def tmpfs(tmp_path):
    disk = Tmpfs(tmp_path / "small")
    yield disk
    if disk.mounted:
        subprocess.run(["umount", "-l", str(disk.path)], check=False)
