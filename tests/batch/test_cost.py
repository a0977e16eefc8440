"""The cost of a study before it is submitted: requested and estimated GPU-hours, waves, bytes, files."""

import subprocess

import numpy as np
import pytest

from histokt.batch import cost
from histokt.batch.sweep import SweepConfig, sweep
from histokt.study import plan
from histokt.study.spec import load
from tests.conftest import ROOT, histokt_cmd
from tests.fixtures.stores import write_v2_dataset

SPEC = """
[study]
name = "t"
store = "{root}/s.zarr"
run_root = "{root}/runs"

[datasets.a]
card = "folder"
raw = "{root}/raw/a"
patches = 1000

[datasets.b]
card = "folder"
raw = "{root}/raw/b"

[stages.pretrain]
datasets = ["a", "b"]
seeds = [0, 1, 2]
[stages.pretrain.recipe]
epochs = 10
[stages.pretrain.resources]
gpus = 2
time_min = 90
"""


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(SPEC.format(root=tmp_path))
    return load(path)


def costs(spec, **kw):
    cells = plan.expand(spec)
    work = {s: list(range(len(c))) for s, c in cells.items()}
    return cost.study_cost(spec, cells, work, {s: 1 for s in cells}, max_queued=4, **kw)


def test_requested_and_estimated_gpu_hours_by_hand(spec):
    c = costs(spec, img_per_s=100.0)["pretrain"]
    assert c.cells == 6 and c.waves == 2  # 6 tasks under a budget of 4
    assert c.requested_gpu_h == pytest.approx(6 * 2 * 90 / 60)
    # a: 1000 patches cut 800/100/100; 10 epochs of train + valid, the test once, on 2 GPUs, 3 seeds
    one = (10 * (800 + 100) + 100) / 100 / 3600 * 2
    assert c.estimated_gpu_h == pytest.approx(3 * one)
    assert c.unknown == {"b"}  # no estimate and not standardized: left out, and named
    # a cell of under 10 minutes writes no full checkpoint (by wall time only); Stage A keeps best.pt, not final
    assert c.bytes_written == pytest.approx(3 * cost.BEST_WRITES * cost.WEIGHTS_BYTES)
    assert c.files == 6 * cost.CELL_FILES


def test_the_stores_counts_replace_the_estimate(spec, tmp_path):
    content = np.zeros((5, 8, 8, 3), np.uint8)
    write_v2_dataset(tmp_path / "s.zarr", "b", {"train": (content, np.zeros(5)), "test": (content[:2], np.zeros(2))}, 8)
    c = costs(spec, img_per_s=100.0)["pretrain"]
    b = (10 * 5 + 2) / 100 / 3600 * 2
    a = (10 * 900 + 100) / 100 / 3600 * 2
    assert c.unknown == set() and c.estimated_gpu_h == pytest.approx(3 * (a + b))


def test_paper_study_cost_is_printed_before_anything_is_submitted(tmp_path, cli_env):
    """jobs/paper.toml, costed without its raw data or store: the issue's ~49,000 GPU-hours asked for."""
    spec = load(ROOT / "jobs" / "paper.toml")
    cells = plan.expand(spec)
    asked = sum(
        spec.stages[s].resources.for_dataset(plan.cell_dataset(c)).gpus
        * spec.stages[s].resources.for_dataset(plan.cell_dataset(c)).time_min
        / 60
        for s in cells
        if s in spec.stages
        for c in cells[s]
    )
    out = sweep(SweepConfig(spec=ROOT / "jobs" / "paper.toml", dry_run=True, executor="slurm", progress=False))
    total = next(line for line in out["cost"].splitlines() if line.startswith("total"))
    assert total.split()[1] == "4675" and f"{asked:,.0f}" in total
    assert "not estimated" not in out["cost"]  # every dataset has a patches estimate
    r = subprocess.run(
        histokt_cmd("sweep", ROOT / "jobs" / "paper.toml", "--dry-run", "--throughput", "2500", "--max-queued", "500"),
        env=cli_env, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "what it will cost" in r.stdout and "queue budget of 500 tasks" in r.stdout and "2,500 images/s" in r.stdout


def test_a_cell_on_several_nodes_asks_for_the_gpus_of_each(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(SPEC.format(root=tmp_path).replace("gpus = 2\n", "gpus = 2\nnodes = 3\n"))
    c = costs(load(path), img_per_s=100.0)["pretrain"]
    assert c.requested_gpu_h == pytest.approx(6 * 3 * 2 * 90 / 60)
    assert c.estimated_gpu_h == pytest.approx(3 * (10 * (800 + 100) + 100) / 100 / 3600 * 6)
