"""`histokt demo` (what `make demo` runs): a synthetic collection through the whole pipeline, here and on SLURM."""

import csv
import os
import subprocess

import pytest
import zarr

from .conftest import ROOT, histokt_cmd
from .slurm_cluster import slurm_cluster  # noqa: F401  (fixture)


def run_demo(out, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TORCH_HOME", None)
    return subprocess.run(histokt_cmd("demo", "--out", out, "--per-class", "4", "--no-progress", *extra), env=env,
                          capture_output=True, text=True, timeout=1500)


def check_outputs(out):
    store = zarr.open_group(str(out / "store.zarr"), mode="r")
    assert sorted(store.group_keys()) == ["crc", "mhist", "pcam"]
    # each at its own native µm/px, standardized to the spec's 112 px at 1 µm/px
    assert {n: store[n].attrs["mpp_native"] for n in ("crc", "mhist", "pcam")} == {
        "crc": 0.5, "mhist": 1.25, "pcam": 0.972}
    summary = out / "runs" / "summary"
    for init in ("random", "imagenet"):
        for mode in ("fine", "deep"):
            for ext in ("csv", "md", "tex", "png"):
                assert (summary / f"matrix_{init}_{mode}.{ext}").stat().st_size > 0
    with open(summary / "distill.csv") as f:
        assert len(list(csv.DictReader(f))) == 2  # with and without the low-rank step
    report = (summary / "report.md").read_text()
    assert "training cells: 32; done 32, failed 0" in report
    assert (out / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth").is_file()  # the staged stand-in


def test_demo_runs_the_whole_study_locally(tmp_path):
    r = run_demo(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SYNTHETIC" in r.stderr and "transfer matrices:" in r.stdout
    check_outputs(tmp_path)
    again = run_demo(tmp_path)  # everything is done: nothing runs again
    assert again.returncode == 0 and "finished in 0.0 min" in again.stdout


@pytest.mark.slurm
def test_demo_on_slurm(slurm_cluster, tmp_path):  # noqa: F811
    r = run_demo(tmp_path, "--executor", "slurm")
    assert r.returncode == 0, r.stderr[-3000:]
    check_outputs(tmp_path)
