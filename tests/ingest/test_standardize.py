"""The standardize pipeline: patch geometry, resume after SIGKILL, shard/worker equivalence, bad input."""

import json
import math
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
import zarr
from PIL import Image

import histokt.ingest.finalize as fin
import histokt.ingest.standardize as st
from histokt import lease
from histokt.errors import UserError
from histokt.ingest.standardize import StandardizeConfig, standardize
from histokt.lease import Lease
from histokt.store.schema import staging_dir
from tests.conftest import histokt_cmd
from tests.fixtures.images import save, tissue
from tests.fixtures.stores import assert_same_store, folder_dataset
from tests.fixtures.stores import folder_config as cfg

PPF = ("--patches-per-file", "4")  # as folder_config


def expected_patches(w, h, mpp, patch=272, stride=204):
    """Hand arithmetic of method.md §2: rescale, mirror-pad to the patch, full windows only."""
    w, h = max(patch, round(w * mpp)), max(patch, round(h * mpp))
    return ((w - patch) // stride + 1) * ((h - patch) // stride + 1)


def test_counts_geometry_and_schema(tmp_path, raw, reference):
    g = zarr.open_group(str(reference / "folder"), mode="r")
    sizes = {p.relative_to(raw).as_posix(): Image.open(p).size for p in raw.rglob("*.png")}
    total = sum(expected_patches(w, h, 1.0) for w, h in sizes.values())
    counts = g.attrs["counts"]
    assert sum(counts.values()) == total
    sources = list(g["sources"][:])
    assert sorted(sources) == sorted(sizes)
    for split in ("train", "valid", "test"):
        n = counts[split]
        assert g[f"{split}/images"].shape == (n, 272, 272, 3)
        assert g[f"{split}/images"].dtype == np.uint8
        assert g[f"{split}/labels"].dtype == np.int64 and g[f"{split}/labels"].shape == (n,)
        assert g[f"{split}/box"].shape == (n, 4)
        for sid, label, box in zip(g[f"{split}/source_id"][:], g[f"{split}/labels"][:], g[f"{split}/box"][:]):
            path = sources[sid]
            assert label == g.attrs["classes"].index(path.split("/")[0])
            w, h = sizes[path]
            x0, y0, x1, y1 = box
            assert x1 - x0 == 272 and y1 - y0 == 272 and x1 <= w and y1 <= h
    # a patch is exactly its box cut from the source image (scale 1: no resampling)
    sid, box = g["train/source_id"][0], g["train/box"][0]
    image = np.asarray(Image.open(raw / sources[sid]).convert("RGB"))
    np.testing.assert_array_equal(g["train/images"][0], image[box[1] : box[3], box[0] : box[2]])
    attrs = g.attrs
    for key in (
        "classes",
        "multi_label",
        "mpp_native",
        "mpp_source",
        "mpp_target",
        "patch_size",
        "stride",
        "filter",
        "split_rule",
        "split_seed",
        "counts",
        "rejected",
        "histokt_version",
    ):
        assert key in attrs
    assert attrs["stride"] == 204 and attrs["patch_size"] == 272 and attrs["split_rule"] == "grouped"
    assert not staging_dir(reference, "folder").exists()


def test_groups_never_straddle_splits(reference):
    g = zarr.open_group(str(reference / "folder"), mode="r")
    seen = {}
    for split in ("train", "valid", "test"):
        for sid in g[f"{split}/source_id"][:]:
            assert seen.setdefault(int(sid), split) == split


def test_rescale_and_padding(tmp_path):
    raw = tmp_path / "raw"
    save(raw / "a" / "small.png", tissue(100, 120, seed=1))  # 0.5 µm/px -> 60x50 -> padded 272x272: 1
    save(raw / "a" / "wide.png", tissue(400, 1400, seed=2))  # -> 700x200 -> 700x272: 3 windows
    standardize(cfg(raw, tmp_path / "s.zarr", mpp=0.5))
    g = zarr.open_group(str(tmp_path / "s.zarr" / "folder"), mode="r")
    assert sum(g.attrs["counts"].values()) == expected_patches(120, 100, 0.5) + expected_patches(1400, 400, 0.5) == 4
    # mirror padding: bottom/right only, the edge pixel not repeated (numpy "reflect")
    small = next(
        s for s in ("train", "valid", "test") if any(g["sources"][i] == "a/small.png" for i in g[f"{s}/source_id"][:])
    )
    k = [g["sources"][i] for i in g[f"{small}/source_id"][:]].index("a/small.png")
    patch = g[f"{small}/images"][k]
    rescaled = np.asarray(Image.fromarray(tissue(100, 120, seed=1)).resize((60, 50), Image.BILINEAR))
    np.testing.assert_array_equal(patch[:50, :60], rescaled)
    np.testing.assert_array_equal(patch[50, :60], rescaled[48])
    np.testing.assert_array_equal(patch[:50, 60], rescaled[:, 58])


def test_rerun_of_finished_dataset_is_a_noop(tmp_path, raw, reference):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*")}
    assert standardize(cfg(raw, reference)).status == "done"
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*")} == before


@pytest.mark.parametrize("shards,workers", [(1, 2), (3, 1), (4, 2)])
def test_store_identical_whatever_shards_and_workers(tmp_path, raw, reference, shards, workers):
    store = tmp_path / "sharded.zarr"
    results = [standardize(cfg(raw, store, shard=f"{i}/{shards}", workers=workers)) for i in range(shards)]
    assert [r.status for r in results] == ["partial"] * (shards - 1) + ["written"]
    assert_same_store(store, reference)


def test_concurrent_shard_processes(tmp_path, raw, reference, cli_env):
    store = tmp_path / "conc.zarr"
    args = ["standardize", "--dataset", "folder", "--raw", raw, "--store", store, "--mpp", "1", *PPF]
    procs = [subprocess.Popen(histokt_cmd(*args, "--shard", f"{i}/2"), env=cli_env) for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    if not (store / "folder").exists():  # both saw a missing part at their end: a plain re-run finalizes
        assert subprocess.run(histokt_cmd(*args), env=cli_env).returncode == 0
    assert_same_store(store, reference)


def test_sigkill_during_parts_then_resume(tmp_path, cli_env):
    raw = folder_dataset(tmp_path, per_class=20, size=700)  # 60 sources -> 60 parts of one source
    ref = tmp_path / "ref.zarr"
    standardize(cfg(raw, ref))
    store = tmp_path / "killed.zarr"
    args = ["standardize", "--dataset", "folder", "--raw", raw, "--store", store, "--mpp", "1", "--no-progress", *PPF]
    proc = subprocess.Popen(histokt_cmd(*args), env=cli_env)
    parts = staging_dir(store, "folder") / "parts"
    while proc.poll() is None and len(list(parts.glob("*.json"))) < 5:
        pass  # wait for the condition: a few parts finished, the run still going
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (store / "folder").exists()  # readers never see the half-made dataset
    done = len(list(parts.glob("*.json")))
    assert 5 <= done < 60
    assert subprocess.run(histokt_cmd(*args), env=cli_env).returncode == 0
    assert_same_store(store, ref)


class Crash(Exception):
    pass


@pytest.mark.parametrize("where", ["_write_meta", "_swap_in"])
def test_crash_during_finalize_then_resume(tmp_path, raw, reference, monkeypatch, where):
    store = tmp_path / "crash.zarr"
    real = getattr(fin, where)
    calls = []

    def crashing(*args, **kw):
        calls.append(1)
        if len(calls) == 2 or where == "_swap_in":  # after the train chunks moved / before the final rename
            raise Crash
        return real(*args, **kw)

    monkeypatch.setattr(fin, where, crashing)
    with pytest.raises(Crash):
        standardize(cfg(raw, store))
    assert not (store / "folder").exists()
    monkeypatch.setattr(fin, where, real)
    assert standardize(cfg(raw, store)).status == "written"
    assert_same_store(store, reference)


def test_patch_split_rule_is_explicit_and_recorded(tmp_path, raw):
    store = tmp_path / "p.zarr"
    standardize(cfg(raw, store, split_rule="patch"))
    g = zarr.open_group(str(store / "folder"), mode="r")
    assert g.attrs["split_rule"] == "patch"
    n = sum(g.attrs["counts"].values())
    assert g.attrs["counts"]["train"] == int(0.8 * n)


def test_split_seed_changes_the_split(tmp_path, raw, reference):
    store = tmp_path / "seed.zarr"
    standardize(cfg(raw, store, split_seed=1))
    a = zarr.open_group(str(reference / "folder"), mode="r")
    b = zarr.open_group(str(store / "folder"), mode="r")
    assert sorted(a["test/source_id"][:]) != sorted(b["test/source_id"][:])


# -- bad input ----------------------------------------------------------------------------------------------


def bad_images(raw):
    (raw / "a" / "zero.png").write_bytes(b"")
    good = (raw / "a" / "img000.png").read_bytes()
    (raw / "a" / "truncated.png").write_bytes(good[: len(good) // 3])
    (raw / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    Image.fromarray(np.dstack([tissue(300, 300, 3), np.full((300, 300, 1), 128, np.uint8)]), "RGBA").save(
        raw / "a" / "transparent.png"
    )


def test_bad_images_are_skipped_and_listed(tmp_path, raw):
    bad_images(raw)
    store = tmp_path / "bad.zarr"
    out = standardize(cfg(raw, store))
    g = zarr.open_group(str(store / "folder"), mode="r")
    reasons = {r["path"]: r["reason"] for r in g.attrs["rejected"]}
    assert set(reasons) == {"a/zero.png", "a/truncated.png", "a/corrupt.png", "a/transparent.png"}
    assert "empty file" in reasons["a/zero.png"]
    assert "corrupt or truncated" in reasons["a/truncated.png"]
    assert "transparent" in reasons["a/transparent.png"]
    assert out.rejected == 4


def test_strict_makes_a_bad_image_fatal_and_writes_nothing(tmp_path, raw, cli_env):
    bad_images(raw)
    store = tmp_path / "strict.zarr"
    args = ["standardize", "--dataset", "folder", "--raw", raw, "--store", store, "--mpp", "1", "--strict", *PPF]
    r = subprocess.run(
        histokt_cmd(*args),
        env=cli_env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "--strict" in r.stderr and ".png" in r.stderr
    assert not (store / "folder").exists() and not staging_dir(store, "folder").exists()


def test_grayscale_rgba_and_16bit_are_converted(tmp_path):
    raw = tmp_path / "raw"
    t = tissue(300, 300, 5)
    Image.fromarray(t[:, :, 1]).save(raw / "a" / "gray.png") if (raw / "a").mkdir(parents=True) is None else None
    Image.fromarray(np.dstack([t, np.full((300, 300, 1), 255, np.uint8)]), "RGBA").save(raw / "a" / "rgba.png")
    Image.fromarray(t[:, :, 0].astype(np.uint16) * 257).save(raw / "a" / "deep.png")
    store = tmp_path / "c.zarr"
    standardize(cfg(raw, store, split_rule="patch"))
    g = zarr.open_group(str(store / "folder"), mode="r")
    assert g.attrs["rejected"] == [] and sum(g.attrs["counts"].values()) == 3
    sources = list(g["sources"][:])
    for split in ("train", "valid", "test"):
        for k, sid in enumerate(g[f"{split}/source_id"][:]):
            patch = g[f"{split}/images"][k]
            name = sources[sid]
            if name == "a/gray.png":
                np.testing.assert_array_equal(patch[:, :, 0], t[:272, :272, 1])
                np.testing.assert_array_equal(patch[:, :, 2], t[:272, :272, 1])
            elif name == "a/rgba.png":
                np.testing.assert_array_equal(patch, t[:272, :272])
            else:
                np.testing.assert_array_equal(patch[:, :, 0], t[:272, :272, 0])  # high byte of 16 bits


def test_decompression_bomb_is_rejected(tmp_path, raw):
    store = tmp_path / "bomb.zarr"
    standardize(cfg(raw, store, max_pixels=400 * 400))
    g = zarr.open_group(str(store / "folder"), mode="r")
    assert len(g.attrs["rejected"]) == 18
    assert all("decompression bomb" in r["reason"] for r in g.attrs["rejected"])


@pytest.mark.parametrize("mpp", [0.0, -1.0, math.nan, math.inf])
def test_bad_mpp(tmp_path, raw, mpp):
    with pytest.raises(UserError, match="--mpp"):
        standardize(cfg(raw, tmp_path / "m.zarr", mpp=mpp))
    assert not (tmp_path / "m.zarr").exists()


def test_folder_card_requires_mpp(tmp_path, raw):
    with pytest.raises(UserError, match="pass --mpp"):
        standardize(StandardizeConfig(dataset="folder", raw=raw, store=tmp_path / "x.zarr", progress=False))


def test_missing_raw_dir(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        standardize(cfg(tmp_path / "nowhere", tmp_path / "x.zarr"))


def test_store_with_other_card_is_refused_unless_overwrite(tmp_path, raw, reference):
    other = folder_dataset(tmp_path / "o", per_class=2, size=300)
    with pytest.raises(UserError, match="--overwrite"):
        standardize(cfg(other, reference, option=["group=img"]))
    assert standardize(cfg(other, reference, option=["group=img"], overwrite=True)).status == "written"
    g = zarr.open_group(str(reference / "folder"), mode="r")
    assert g.attrs["card"]["options"] == {"group": "img", "class_regex": ""}
    assert sum(g.attrs["counts"].values()) == 6


def test_a_card_option_added_later_keeps_fingerprints(tmp_path, raw, monkeypatch):
    from histokt.ingest.cards.folder import Folder

    _, before = st.make_worklist(cfg(raw, tmp_path / "s.zarr", option=["group=img"]))
    monkeypatch.setattr(Folder, "OPTION_DEFAULTS", {**Folder.OPTION_DEFAULTS, "added_later": ""})
    _, after = st.make_worklist(cfg(raw, tmp_path / "s.zarr", option=["group=img"]))
    assert after.settings["card"]["options"]["added_later"] == "" and after.fingerprint == before.fingerprint
    _, other = st.make_worklist(cfg(raw, tmp_path / "s.zarr", option=["group=img", "added_later=x"]))
    assert other.fingerprint != before.fingerprint


def test_unknown_card_option(tmp_path, raw):
    with pytest.raises(UserError, match="unknown option 'nope'"):
        standardize(cfg(raw, tmp_path / "x.zarr", option=["nope=1"]))


def test_bad_shard_spec(tmp_path, raw):
    for spec in ("3/3", "x", "1/0"):
        with pytest.raises(UserError, match="--shard"):
            standardize(cfg(raw, tmp_path / "x.zarr", shard=spec))


def test_unfinished_run_with_other_settings_is_refused(tmp_path, raw):
    store = tmp_path / "u.zarr"
    assert standardize(cfg(raw, store, shard="0/2")).status == "partial"
    with pytest.raises(UserError, match="unfinished run"):
        standardize(cfg(raw, store, shard="1/2", stride=100))
    worklist = json.loads((staging_dir(store, "folder") / "worklist.json").read_text())
    assert worklist["settings"]["stride"] == 204


def test_max_per_class_is_a_seeded_subset_per_class(tmp_path, raw, reference):
    store = tmp_path / "cap.zarr"
    standardize(cfg(raw, store, max_per_class=2))
    g = zarr.open_group(str(store / "folder"), mode="r")
    full = zarr.open_group(str(reference / "folder"), mode="r")
    sources = list(g["sources"][:])
    # 2 of each class folder's 6 images, a subset of the full dataset's sources
    assert sorted(p.split("/")[0] for p in sources) == ["a", "a", "b", "b", "c", "c"]
    assert set(sources) < set(full["sources"][:])
    assert g.attrs["max_per_class"] == 2 and g.attrs["fingerprint"] != full.attrs["fingerprint"]
    again = tmp_path / "again.zarr"  # the same choice every time; another split seed chooses others
    standardize(cfg(raw, again, max_per_class=2))
    assert list(zarr.open_group(str(again / "folder"), mode="r")["sources"][:]) == sources
    other = tmp_path / "other.zarr"
    standardize(cfg(raw, other, max_per_class=2, split_seed=3))
    assert list(zarr.open_group(str(other / "folder"), mode="r")["sources"][:]) != sources


def test_subsample_keeps_every_official_partition():
    from histokt.ingest.cards.base import Source

    sources = [Source(f"{part}/{i}", i % 2, part, f"{part}{i}") for part in ("test", "train") for i in range(10)]
    kept = st.subsample(sources, 3, seed=0)
    assert sorted((s.partition, s.label) for s in kept) == sorted(
        (p, c) for p in ("test", "train") for c in (0, 1) for _ in range(3)
    )
    assert kept == [s for s in sources if s in kept]  # the listing's order is kept
    assert st.subsample(sources, 10, seed=0) == sources


def test_bad_max_per_class(tmp_path, raw):
    with pytest.raises(UserError, match="--max-per-class 0: must be at least 1"):
        standardize(cfg(raw, tmp_path / "s.zarr", max_per_class=0))
    assert not (tmp_path / "s.zarr").exists()


def test_finalize_lock_is_never_seen_empty_and_excludes_a_second_taker(tmp_path):
    lock = tmp_path / "finalize.lock"
    assert Lease.acquire(lock, stale_after=fin.LOCK_STALE_S)
    host, pid, _ = lock.read_text().split()[:3]  # whole from the moment it exists (a hard link of a written file)
    assert int(pid) == os.getpid() and not lease.is_stale(lock)
    assert not Lease.acquire(lock)  # held by a live process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finalize.lock"]  # no temporary left behind
    lock.write_text(f"{host} 999999999 0\n")  # a dead local process's lock is taken over
    assert lease.is_stale(lock) and Lease.acquire(lock) and lock.read_text().split()[1] == str(os.getpid())


def test_a_shard_arriving_after_another_finalized_reports_done(tmp_path, raw, reference):
    store = tmp_path / "late.zarr"
    standardize(cfg(raw, store))
    _, worklist = st.make_worklist(cfg(raw, store))
    gone = staging_dir(store, "folder")  # removed by the finalizing shard
    assert not gone.exists()
    r = fin.finalize_locked(store, "folder", gone, worklist)
    assert r.status == "done" and r.counts == zarr.open_group(str(store / "folder"), mode="r").attrs["counts"]


# -- format 2: packed files, no stored padding --------------------------------------------------------------

DIE_IN_THIRD_SHARD = """
import os, signal, sys
import histokt.ingest.finalize as fin
from histokt.cli import main

real, calls = fin.write_shard, []


def dying(path, patches, **kw):  # killed with two patches of the third shard in its temporary file
    calls.append(path)

    def patches_then_death():
        for j, patch in enumerate(patches):
            if len(calls) == 3 and j == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            yield patch

    return real(path, patches_then_death(), **kw)


fin.write_shard = dying
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_while_packing_shards_then_resume(tmp_path, raw, reference, cli_env):
    store = tmp_path / "packing.zarr"
    args = ["standardize", "--dataset", "folder", "--raw", raw, "--store", store, "--mpp", "1", "--no-progress", *PPF]
    killed = subprocess.run(
        [*histokt_cmd()[:1], "-c", DIE_IN_THIRD_SHARD, *map(str, args)], env=cli_env, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL
    final = staging_dir(store, "folder") / "final"
    assert len(list(final.glob("*/images/c.*"))) == 2  # two whole shards, and a third half-written …
    assert len(list(final.glob("*/images/.c.*.tmp"))) == 1  # … under a temporary name only
    assert not (store / "folder").exists()
    assert subprocess.run(histokt_cmd(*args), env=cli_env).returncode == 0
    assert_same_store(store, reference)


def test_files_per_dataset_do_not_grow_with_its_patches(tmp_path, monkeypatch):
    """The inode budget: a fixed few files per dataset plus one per shard file (512 patches), in the store
    and while standardizing (a few per part: data, manifest, lease; never one per patch)."""
    counts, staged, real = {}, {}, fin.finalize_locked

    def count_staging(store_, name, staging, *a, **kw):
        staged["files"] = sum(1 for _ in staging.rglob("*"))
        return real(store_, name, staging, *a, **kw)

    monkeypatch.setattr(st, "finalize_locked", count_staging)
    for n in (3, 12):
        raw = folder_dataset(tmp_path / f"n{n}", per_class=n, size=700)  # 9 patches per image
        store = tmp_path / f"n{n}.zarr"
        r = standardize(cfg(raw, store, patches_per_file=512))
        total = sum(r.counts.values())
        files = sum(1 for _ in (store / "folder").rglob("*"))
        counts[n] = (total, files, staged["files"], len(st.make_worklist(cfg(raw, store))[1].parts))
    (small, files_small, _, _), (big, files_big, staging_big, parts) = counts[3], counts[12]
    assert big >= 300 and big >= 3 * small
    assert files_big == files_small  # 4x the patches, no more files (every split fits one shard)
    assert files_big <= 60  # the groups and small arrays: a fixed few dozen
    assert staging_big <= 2 * parts + 4  # part data files and manifests, the worklist, the parts folder


def test_small_sources_are_stored_as_their_content_and_read_back_padded(tmp_path):
    """A PCam-like dataset (96 px at 0.972 µm/px: 93 px of content): the store holds 93 x 93 x 3 bytes per
    patch, and each patch read is the rescaled source mirror-padded as format 1 stored it."""
    raw = tmp_path / "raw"
    for i in range(6):
        save(raw / ("a" if i % 2 else "b") / f"p{i}.png", tissue(96, 96, seed=i))
    store = tmp_path / "pcam.zarr"
    r = standardize(cfg(raw, store, mpp=0.972))
    attrs = zarr.open_group(str(store / "folder"), mode="r").attrs
    assert attrs["content_size"] == [93, 93] and attrs["patch_size"] == 272
    sources = zarr.open_group(str(store / "folder"), mode="r")["sources"][:]
    from histokt.store.schema import PatchReader

    for split, n in r.counts.items():
        reader = PatchReader(store, "folder", split)
        ids = zarr.open_array(str(store / "folder" / split / "source_id"), mode="r")[:]
        for k in range(n):
            source = np.asarray(Image.open(raw / sources[ids[k]]).convert("RGB").resize((93, 93), Image.BILINEAR))
            want = np.pad(source, [(0, 179), (0, 179), (0, 0)], mode="reflect")
            np.testing.assert_array_equal(reader.read(k), want)
        shard = store / "folder" / split / "images" / "c.0.0.0.0"
        assert shard.stat().st_size == min(n, 4) * (93 * 93 * 3 + 4) + 4 * 16 + 4


def test_a_format_1_dataset_of_that_name_is_upgraded_or_overwritten_never_trusted(tmp_path, raw, reference):
    old = tmp_path / "old.zarr"
    shutil.copytree(reference, old)
    meta = old / "folder" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["format"] = "histokt-patches/1"  # same fingerprint, the old format
    meta.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=rf"store format histokt-patches/1; .*'histokt store upgrade {old} NEW_STORE'"):
        standardize(cfg(raw, old))
    assert standardize(cfg(raw, old, overwrite=True)).status == "written"
    assert_same_store(old, reference)
