"""`histokt demo` from any install: its spec ships inside the package (histokt/batch/demo.toml, package data), so a
wheel installed outside the checkout runs the demo with no jobs/ folder in sight.

jobs/demo.toml stays where users look for specs; the package copy is what the code reads. The two are kept
identical by test_the_packaged_demo_spec_is_jobs_demo_toml (copy jobs/demo.toml over the package file after an edit).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from histokt.batch import demo
from tests.conftest import ROOT

PACKAGED = ROOT / "histokt" / "batch" / "demo.toml"


def test_the_packaged_demo_spec_is_jobs_demo_toml():
    assert PACKAGED.read_bytes() == (ROOT / "jobs" / "demo.toml").read_bytes(), (
        "histokt/batch/demo.toml (what histokt demo reads) differs from jobs/demo.toml: "
        "copy jobs/demo.toml over histokt/batch/demo.toml"
    )
    assert demo.TEMPLATE.read_text() == PACKAGED.read_text()  # read through importlib.resources
    assert "histokt/batch/demo.toml" in (ROOT / "setup.cfg").read_text().replace("histokt.batch = ", "histokt/batch/")


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_runs_the_demo(tmp_path):
    # a copy of what a wheel is built from: the build writes build/ and *.egg-info beside the sources, not here
    src = tmp_path / "src"
    shutil.copytree(ROOT / "histokt", src / "histokt", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, src]
    subprocess.run(build, check=True, env=clean, cwd=tmp_path, timeout=300)
    (wheel,) = wheels.glob("histokt-*.whl")

    # a fresh virtualenv that reuses the test environment's packages (torch & co.) through a .pth file, but not
    # its histokt: a directory named in a .pth is only put on sys.path, its own .pth files (the editable install's
    # finder) are not run
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        env=clean,
    ).stdout.strip()
    Path(site, "test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], check=True, env=clean, timeout=300
    )

    work = tmp_path / "elsewhere"  # outside the checkout, no jobs/ folder
    work.mkdir()
    env = {**clean, "PATH": f"{venv / 'bin'}{os.pathsep}{clean['PATH']}"}
    env.pop("TORCH_HOME", None)
    where = subprocess.run(
        [python, "-c", "import histokt; print(histokt.__file__)"], cwd=work, env=env, capture_output=True, text=True
    )
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr  # the wheel's histokt, not the checkout's
    r = subprocess.run(
        [venv / "bin" / "histokt", "demo", "--per-class", "4", "--no-progress", "--out", "demo"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "demo: finished in" in r.stdout and "transfer matrices:" in r.stdout, r.stdout
    summary = work / "demo" / "runs" / "summary"
    for name in ("matrix_random_deep.csv", "matrix_imagenet_fine.md", "distill.md", "report.md"):
        assert (summary / name).stat().st_size > 0, name
    assert "training cells: 32; done 32, failed 0" in (summary / "report.md").read_text()
