"""`histokt demo` (what `make demo` runs): synthetic CRC-like raw data standardized into a store."""

import subprocess

import zarr

from .conftest import histokt_cmd


def test_demo_standardizes_synthetic_crc(tmp_path, cli_env):
    r = subprocess.run(histokt_cmd("demo", "--out", tmp_path, "--per-class", "3"), env=cli_env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "store.zarr/crc" in r.stdout
    g = zarr.open_group(str(tmp_path / "store.zarr" / "crc"), mode="r")
    assert g.attrs["classes"] == ["ADI", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    # 224 px at 0.5 µm/px -> 112 px, mirror-padded to one 272 patch per image; CRC-VAL-HE-7K is the test split
    assert g.attrs["counts"]["test"] == 7 * 2
    assert g.attrs["counts"]["train"] + g.attrs["counts"]["valid"] == 7 * 3
    assert "warning: crc: 100k has 21 sources" in r.stderr
