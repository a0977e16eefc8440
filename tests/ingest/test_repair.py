"""Integrity end to end: a purged, a truncated and a corrupted shard file are named by the reader, stop
training before its first step, are listed exactly by verify, and `standardize --repair` re-creates exactly
those shard files, byte for byte, from the raw data."""

import shutil
import subprocess

import pytest

from histokt.errors import UserError
from histokt.ingest.standardize import standardize
from histokt.store.schema import PatchReader, StoreDamaged
from histokt.store.shards import shard_path
from histokt.store.verify import damaged_shards
from tests.conftest import histokt_cmd
from tests.fixtures.stores import assert_same_store, folder_dataset, tree_bytes
from tests.fixtures.stores import folder_config as cfg

DAMAGE = {("train", 0): "missing", ("train", 2): "truncated", ("test", 0): "flipped"}


def damage(store) -> dict:
    """Delete, truncate and corrupt one shard file each; returns {(split, shard): path}."""
    paths = {}
    for (split, s), how in DAMAGE.items():
        path = shard_path(store / "folder" / split / "images", s)
        data = path.read_bytes()
        if how == "missing":
            path.unlink()
        elif how == "truncated":
            path.write_bytes(data[: len(data) // 2])
        else:
            path.write_bytes(data[:1000] + bytes([data[1000] ^ 0x10]) + data[1001:])
        paths[(split, s)] = path
    return paths


@pytest.fixture
def hurt(tmp_path, reference):
    store = tmp_path / "hurt.zarr"
    shutil.copytree(reference, store)
    counts = PatchReader(store, "folder", "train")
    assert len(counts) >= 9  # three train shards of 4
    return store, damage(store)


def test_verify_lists_exactly_the_damaged_shards_and_repair_restores_them(tmp_path, raw, reference, hurt, cli_env):
    store, paths = hurt
    untouched = {k: v for k, v in tree_bytes(store).items() if "images/c." not in k}
    found = damaged_shards(store, "folder")
    assert {(d.split, d.shard) for d in found} == set(DAMAGE)
    assert {d.path for d in found} == {str(p) for p in paths.values()}
    verify = subprocess.run(histokt_cmd("verify", store), env=cli_env, capture_output=True, text=True)
    assert verify.returncode == 1 and all(str(p) in verify.stdout + verify.stderr for p in paths.values())
    r = subprocess.run(
        histokt_cmd("standardize", "--dataset", "folder", "--raw", raw, "--store", store, "--mpp", "1",
                    "--patches-per-file", "4", "--repair", "--no-progress"),
        env=cli_env, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{store}/folder: re-created 3 damaged shard files from the raw data: ")
    assert sorted(r.stdout.strip().split(": ", 2)[2].split(", ")) == sorted(str(p) for p in paths.values())
    assert_same_store(store, reference)
    assert subprocess.run(histokt_cmd("verify", store), env=cli_env, capture_output=True).returncode == 0
    assert {k: v for k, v in tree_bytes(store).items() if "images/c." not in k} == untouched
    assert damaged_shards(store, "folder") == []
    again = standardize(cfg(raw, store, repair=True))  # nothing left to repair
    assert again.status == "repaired" and again.repaired == []
    assert not (tmp_path / ".hurt.zarr.staging").exists()


def test_repair_redoes_only_the_parts_of_the_damaged_shards(tmp_path, raw, reference, monkeypatch):
    import histokt.ingest.standardize as st

    store = tmp_path / "one.zarr"
    shutil.copytree(reference, store)
    shard_path(store / "folder" / "test" / "images", 0).unlink()
    done = []
    real = st.process_part
    monkeypatch.setattr(st, "process_part", lambda task: done.append(task.first) or real(task))
    assert standardize(cfg(raw, store, repair=True)).status == "repaired"
    assert_same_store(store, reference)
    parts = len(st.make_worklist(cfg(raw, store))[1].parts)
    assert 1 <= len(done) < parts  # the test split's sources only


def test_repair_refuses_what_it_cannot_mend(tmp_path, raw, reference):
    with pytest.raises(UserError, match=r"no such dataset to repair; run without --repair"):
        standardize(cfg(raw, tmp_path / "none.zarr", repair=True))
    with pytest.raises(UserError, match=r"made with .*; --repair needs its original options"):
        standardize(cfg(raw, reference, repair=True, split_seed=9))
    with pytest.raises(UserError, match=r"--repair and --overwrite: choose one"):
        standardize(cfg(raw, reference, repair=True, overwrite=True))
    (reference / "folder" / "valid" / "labels" / "zarr.json").unlink()
    with pytest.raises(UserError, match=r"valid/labels.*not a shard file, so --repair cannot re-create it"):
        standardize(cfg(raw, reference, repair=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_reading_a_damaged_store_fails_clearly_and_training_stops_before_its_first_step(
    tmp_path, hurt, cli_env, workers
):
    """In the main process, or in DataLoader workers (whose errors torch raises again with the worker's
    traceback as the message): one line, exit 2."""
    store, _ = hurt
    with pytest.raises(StoreDamaged, match=r"split train, patch 0: .*c.0.0.0.0: the shard file is missing"):
        PatchReader(store, "folder", "train").read(0)
    out = tmp_path / "run"
    r = subprocess.run(
        histokt_cmd(
            "train", "--store", store, "--dataset", "folder", "--out", out, "--epochs", "1", "--batch-size", "4",
            "--workers", workers, "--device", "cpu", "--no-progress",
        ),
        env=cli_env,
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "the store is damaged" in r.stderr and "--repair" in r.stderr
    assert not list(out.rglob("*.pt"))  # no step taken, nothing saved


def test_a_damaged_shard_is_found_on_a_fresh_dataset_too(tmp_path):
    """verify names a shard by the dataset, split and file; --dataset restricts it to one dataset."""
    raw = folder_dataset(tmp_path / "b", per_class=4, size=500)
    store = tmp_path / "two.zarr"
    standardize(cfg(raw, store))
    standardize(cfg(raw, store, name="other"))
    shard_path(store / "other" / "train" / "images", 1).unlink()
    assert damaged_shards(store, "folder") == []
    assert [(d.dataset, d.split, d.shard) for d in damaged_shards(store, "other")] == [("other", "train", 1)]
