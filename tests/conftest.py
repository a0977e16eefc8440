import os
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
