"""Real histology from ../shared/data: LC25000 lung standardizes; Kather 2016 empty tiles are filtered."""

import subprocess

import numpy as np
import pytest
import zarr

from tests.conftest import histokt_cmd

pytestmark = pytest.mark.realdata


def test_lc25000_lung_folder_with_mpp(shared_data, tmp_path, cli_env):
    store = tmp_path / "lung.zarr"
    r = subprocess.run(
        histokt_cmd(
            "standardize",
            "--dataset",
            "folder",
            "--raw",
            shared_data / "lc25000-lung",
            "--store",
            store,
            "--mpp",
            "1.0",
            "--name",
            "lung",
            "--workers",
            "2",
        ),
        env=cli_env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    g = zarr.open_group(str(store / "lung"), mode="r")
    assert g.attrs["classes"] == ["lung_aca", "lung_n", "lung_scc"]
    # 1,200 JPEGs of 224x224 at 1 µm/px: each mirror-padded to 272x272, one patch; none is blank
    assert g.attrs["counts"] == {"train": 960, "valid": 120, "test": 120}
    assert g.attrs["rejected"] == [] and g.attrs["mpp_source"] == "--mpp"
    labels = np.concatenate([g[f"{s}/labels"][:] for s in ("train", "valid", "test")])
    assert np.bincount(labels).tolist() == [400, 400, 400]


def test_kather2016_empty_tiles_are_rejected_tissue_kept(shared_data, tmp_path, cli_env):
    store = tmp_path / "kather.zarr"
    raw = shared_data / "kather2016-samples"
    r = subprocess.run(
        histokt_cmd("standardize", "--dataset", "folder", "--raw", raw, "--store", store, "--mpp", "0.495"),
        env=cli_env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    g = zarr.open_group(str(store / "folder"), mode="r")
    sources = list(g["sources"][:])
    kept = {sources[i] for s in ("train", "valid", "test") for i in g[f"{s}/source_id"][:]}
    empty = {s for s in sources if s.startswith("08_EMPTY/")}
    assert len(empty) == 3 and not (kept & empty)  # glass: rejected by the low-contrast filter
    assert kept == set(sources) - empty  # every tissue tile (150 px at 0.495 -> 74 px, padded) kept


def test_lc25000_trains_clearly_better_than_chance(shared_data, tmp_path):
    from histokt.ingest.standardize import StandardizeConfig, standardize
    from histokt.train.config import TrainConfig
    from histokt.train.launch import train

    store = tmp_path / "lung.zarr"
    # 224 px tiles at an assumed 1 µm/px, standardized to 2 µm/px and 112 px patches to keep CPU training short
    standardize(
        StandardizeConfig(
            dataset="folder",
            raw=shared_data / "lc25000-lung",
            store=store,
            name="lung",
            mpp=1.0,
            target_mpp=2.0,
            patch_size=112,
            stride=112,
            workers=2,
            progress=False,
        )
    )
    result = train(
        TrainConfig(
            store=store,
            dataset="lung",
            out=tmp_path / "run",
            epochs=3,
            batch_size=32,
            optimizer="adamw",
            lr=1e-3,
            workers=1,
            device="cpu",
            progress=False,
        )
    ).result
    assert result is not None  # not interrupted
    # chance is 1/3 on three balanced classes
    assert result.test["top1"] > 0.6, result.test
    assert result.test["balanced_acc"] > 0.6
