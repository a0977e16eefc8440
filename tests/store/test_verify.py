"""`histokt verify`: a sound store passes; each damaged shard (deleted, truncated, one byte flipped) is
listed, and nothing else; metadata that disagrees with the attrs is named; format 1 is refused in one line."""

import json
import shutil

import numpy as np
import pytest

from histokt.cli import main
from histokt.store.shards import shard_path
from histokt.store.verify import Damage, damaged_shards, verify_store
from tests.fixtures.format1 import labels_of, pcam_like, write_v1_dataset
from tests.fixtures.stores import write_v2_dataset

H, W, P = 9, 7, 16


def content(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


@pytest.fixture
def store(tmp_path):
    """Two format-2 datasets, 4 patches per shard: alpha 10 / 5 / 3 patches (3 + 2 + 1 shards, partial
    last shards), beta 8 / 0 / 6 (2 + 0 + 2 shards)."""
    s = tmp_path / "store.zarr"
    write_v2_dataset(
        s,
        "alpha",
        {
            "train": (content(10, 1), labels_of(10)),
            "valid": (content(5, 2), labels_of(5)),
            "test": (content(3, 3), labels_of(3)),
        },
        P,
    )
    write_v2_dataset(s, "beta", {"train": (content(8, 4), labels_of(8)), "test": (content(6, 5), labels_of(6))}, P)
    return s


def images(store, dataset, split):
    return store / dataset / split / "images"


def damage(store):
    """Delete alpha train shard 1, truncate alpha valid shard 0, flip one byte of patch 5 in beta test shard 1."""
    shard_path(images(store, "alpha", "train"), 1).unlink()
    valid = shard_path(images(store, "alpha", "valid"), 0)
    valid.write_bytes(valid.read_bytes()[:100])
    test = shard_path(images(store, "beta", "test"), 1)
    data = bytearray(test.read_bytes())
    data[(H * W * 3 + 4) + 17] ^= 0x01  # slot 1 of shard 1 (4 per shard): patch 5
    test.write_bytes(bytes(data))


def run(capsys, *args):
    code = main(["verify", *map(str, args), "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_sound_store_verifies(store, capsys):
    code, out, err = run(capsys, store)
    assert code == 0, out + err
    assert out.splitlines() == [out.splitlines()[0]]  # the summary alone
    summary = out.splitlines()[0]
    assert summary.startswith(f"{store}: 2 datasets, 6 splits, 10 shards, 32 patches, ")
    assert "GB checked in" in summary and "MB/s" in summary and summary.endswith(": sound")
    report = verify_store(store, progress=False)
    assert report.sound and report.patches == 32 and report.shards == 10
    assert report.nbytes == sum(p.stat().st_size for p in store.rglob("c.*.0.0.0"))


def test_each_damaged_shard_is_listed_and_nothing_else(store, capsys):
    damage(store)
    code, out, _ = run(capsys, store)
    assert code == 1
    lines = out.splitlines()
    listed = [line for line in lines if line.startswith(("alpha", "beta"))]
    train1 = shard_path(images(store, "alpha", "train"), 1)
    valid0 = shard_path(images(store, "alpha", "valid"), 0)
    test1 = shard_path(images(store, "beta", "test"), 1)
    assert len(listed) == 3, out
    assert listed[0].startswith(f"alpha train shard 1: {train1}: is missing"), out
    assert listed[1].startswith(f"alpha valid shard 0: {valid0}: is truncated"), out
    assert listed[2] == f"beta test shard 1: {test1}: patch 5: " + listed[2].split(": patch 5: ")[1], out
    assert "patch checksum mismatch" in listed[2]
    assert ": DAMAGED (3 damaged files)" in lines[3]
    hints = lines[4:]
    assert len(hints) == 2 and hints[0].startswith("to repair alpha: ") and hints[1].startswith("to repair beta: ")
    assert f"--store {store} --name beta --repair" in hints[1]


def test_damaged_shards_names_split_and_shard(store):
    damage(store)
    alpha = damaged_shards(store, "alpha")
    assert {(d.split, d.shard) for d in alpha} == {("train", 1), ("valid", 0)}
    assert all(isinstance(d, Damage) and d.dataset == "alpha" and d.problems for d in alpha)
    assert [(d.split, d.shard) for d in damaged_shards(store, "beta")] == [("test", 1)]
    assert damaged_shards(store, "beta", workers=3) == damaged_shards(store, "beta")


def test_dataset_restricts_the_check(store, capsys):
    damage(store)
    code, out, _ = run(capsys, store, "--dataset", "beta", "--workers", "2")
    assert code == 1
    assert [line for line in out.splitlines() if line.startswith(("alpha", "beta"))] == [out.splitlines()[0]]
    assert out.splitlines()[0].startswith("beta test shard 1: ")
    assert ": 1 datasets, 3 splits, 4 shards, 14 patches" in out
    shutil.rmtree(store / "alpha")
    assert run(capsys, store, "--dataset", "beta")[0] == 1
    code, _, err = run(capsys, store, "--dataset", "alpha")
    assert code == 2 and "no dataset 'alpha' (datasets in this store: beta)" in err


def test_metadata_that_disagrees_is_named(store):
    extra = shard_path(images(store, "alpha", "test"), 1)  # test holds 3 patches: one shard
    shutil.copyfile(shard_path(images(store, "alpha", "test"), 0), extra)
    meta = store / "beta" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["counts"]["train"] = 9
    doc["attributes"]["content_size"] = [H, W + 1]
    meta.write_text(json.dumps(doc))
    shutil.rmtree(store / "alpha" / "valid" / "box")
    found = verify_store(store, progress=False).damage
    assert all(d.shard is None for d in found), found
    where = {(d.dataset, d.split, d.path.removeprefix(str(store))) for d in found}
    assert where == {
        ("alpha", "valid", "/alpha/valid/box"),
        ("alpha", "test", "/alpha/test/images/c.1.0.0.0"),
        ("beta", "train", "/beta/train/images/zarr.json"),
        ("beta", "valid", "/beta/valid/images/zarr.json"),
        ("beta", "test", "/beta/test/images/zarr.json"),
    }, found
    beta_train = next(d for d in found if d.dataset == "beta" and d.split == "train")
    assert any("holds 8 patches, the dataset's attrs count 9" in p for p in beta_train.problems)
    assert any(f"content of {H}x{W} px" in p for p in beta_train.problems)
    assert "a stray shard file" in next(d for d in found if d.split == "test" and d.dataset == "alpha").problems[0]


def test_format_1_and_non_stores_are_one_line_errors(tmp_path, capsys):
    old = tmp_path / "old.zarr"
    write_v1_dataset(old, "pcam", {"train": (pcam_like(2, content=5, patch_size=P), labels_of(2))})
    code, out, err = run(capsys, old)
    assert code == 2 and not out
    assert err.count("\n") == 1 and err.startswith("histokt verify: error: ")
    assert f"histokt store upgrade {old} NEW_STORE" in err
    code, _, err = run(capsys, tmp_path / "absent")
    assert code == 2 and "not a histokt store" in err and err.count("\n") == 1
    code, _, err = run(capsys, old, "--workers", "0")
    assert code == 2 and "--workers 0" in err
