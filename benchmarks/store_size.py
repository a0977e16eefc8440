"""Bytes on disk and inodes of the patch store (format histokt-patches/2) for real tissue, PCam-like and
CRC-like, at two dataset sizes.

    .venv/bin/python benchmarks/store_size.py [--data ../shared/data] [--sizes 1000 10000] [--workers 2]

Input: the real H&E tiles of ``../shared/data`` (read in place, never copied into the repository; the
script stops with a clear message where the folder is absent):

    PCam-like  96x96 px at 0.972 µm/px, like PCam: from every 224 px tile of nct-crc-he-samples (0.5 µm/px)
               and lc25000-lung, a 187 px window (93 µm), and from every 150 px tile of kather2016-samples
               (0.495 µm/px) the whole tile, resized to 96 px; standardized with --mpp 0.972, so each image
               is one 93x93 content patch (padded to 272 px on read)
    CRC-like   the 224 px tiles of nct-crc-he-samples and lc25000-lung as they are (NCT's 0.5 µm/px),
               standardized with --mpp 0.5: one 112x112 content patch each

Each dataset is made of ``--sizes`` images (default about 1,000 and 10,000) by cycling through the tiles
with small variations: the 8 flips and quarter turns, a random window position (PCam-like), and past the
8 variants a brightness shift of a few grey levels (CRC-like). The images are generated once under
--work (default $TMPDIR/histokt-bench/store-size) and cached; each is one source, class = its source
folder (or NCT's file-name prefix).

Each is standardized with the folder card into a fresh store (``--workers`` processes). Reported per
dataset: the patches kept, the content size, the codec of the images arrays (read from their zarr.json),
bytes on disk per patch of the images shard files (sum of st_size and sum of st_blocks x 512, divided by
the patches) and of the whole dataset folder, and inodes (files + folders): of the finished dataset, and
the peak of the store plus its staging sibling ``.<store>.staging`` (counted right before the final
rename, when every part's data file and every packed shard exist at once); both per 10,000 patches beyond
the fixed count of a tiny dataset of 64 images of the same kind (64 parts, 3 non-empty splits: the
per-dataset part), and as the growth between the two sizes. Format 1 (one uncompressed 272 px padded
patch per file, in 3 folders of its own) is given for reference from its fixed layout: 221,952 bytes
(225,280 allocated in 4 KiB blocks) and 4 inodes per patch. Measured, never asserted; the numbers go to
benchmarks/results/store_size.json.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import DEFAULT_WORK, footprint, load, machine_info, markdown_table, write_results  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
TINY = 64
KINDS = {  # kind: (--mpp, image side, file suffix)
    "pcam-like": (0.972, 96, ".png"),
    "crc-like": (0.5, 224, ".jpg"),
}
FORMAT1_BYTES, FORMAT1_ALLOCATED, FORMAT1_INODES = 272 * 272 * 3, 55 * 4096, 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA, help=f"the shared real-tissue folder ({DATA})")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK / "store-size", help="image cache and scratch stores")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="images per dataset (1000 10000)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--workers", type=int, default=2, help="standardize worker processes (2)")
    p.add_argument("--out", default="store_size", help="results file name: benchmarks/results/OUT.json")
    return p.parse_args(argv)


# -- the input images -------------------------------------------------------------------------------------


def tiles(data: Path, kind: str) -> list[tuple[str, Path]]:
    """(class, path) of the real tiles a kind is made from, in a fixed order."""
    out = []
    for path in sorted((data / "nct-crc-he-samples").glob("*.tif")):
        out.append((f"nct_{path.name.split('-')[0]}", path))
    for path in sorted((data / "lc25000-lung").glob("*/*.jpeg")):
        out.append((f"lc_{path.parent.name}", path))
    if kind == "pcam-like":  # 150 px: as CRC-like input it would give a second content size
        for path in sorted((data / "kather2016-samples").glob("*/*.tif")):
            out.append((f"kather_{path.parent.name}", path))
    return out


def dihedral(a: np.ndarray, v: int) -> np.ndarray:
    """One of the 8 flips and quarter turns."""
    a = np.rot90(a, v % 4)
    return a[:, ::-1] if (v // 4) % 2 else a


def make_image(kind: str, tile: np.ndarray, k: int, v: int) -> Image.Image:
    """Image ``k`` (variant ``v`` of its tile) of a kind."""
    rng = np.random.default_rng(k)
    if kind == "pcam-like":
        h, w = tile.shape[:2]
        side = min(187, h, w)  # 93 µm at 0.5 µm/px; kather's 150 px tile whole
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        window = np.ascontiguousarray(dihedral(tile[y : y + side, x : x + side], v))
        return Image.fromarray(window).resize((96, 96), Image.Resampling.LANCZOS)
    out = dihedral(tile, v)
    if v >= 8:  # past the 8 variants: a brightness shift of a few grey levels
        out = np.clip(out.astype(np.int16) + int(rng.integers(-6, 7)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(out))


def image_pool(data: Path, work: Path, kind: str, n: int) -> list[Path]:
    """The first ``n`` images of a kind (generated where missing): class folder / file."""
    sources = tiles(data, kind)
    suffix = KINDS[kind][2]
    pool = work / f"images-{kind}"
    paths = [pool / sources[k % len(sources)][0] / f"img_{k:06d}{suffix}" for k in range(n)]
    todo = [k for k, p in enumerate(paths) if not p.is_file()]
    if todo:
        print(f"generating {len(todo)} {kind} images in {pool} (cached for later runs)...", file=sys.stderr, flush=True)
        decoded: dict[Path, np.ndarray] = {}
        for k in todo:
            _, src = sources[k % len(sources)]
            if src not in decoded:
                decoded[src] = np.asarray(Image.open(src).convert("RGB"))
            img = make_image(kind, decoded[src], k, k // len(sources))
            paths[k].parent.mkdir(parents=True, exist_ok=True)
            tmp = paths[k].with_name(f".{paths[k].name}.tmp")
            img.save(tmp, format="PNG" if suffix == ".png" else "JPEG", **({} if suffix == ".png" else {"quality": 95}))
            tmp.replace(paths[k])
    return paths


def raw_folder(data: Path, work: Path, kind: str, n: int) -> Path:
    """A folder-card raw dir of the first ``n`` images of a kind: hard links into the pool."""
    raw = work / f"raw-{kind}-{n}"
    for p in image_pool(data, work, kind, n):
        dst = raw / p.parent.name / p.name
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                dst.hardlink_to(p)
            except OSError:
                shutil.copyfile(p, dst)
    return raw


# -- one dataset ------------------------------------------------------------------------------------------


def standardize_counted(raw: Path, store: Path, mpp: float, workers: int) -> dict:
    """Standardize ``raw`` into a fresh ``store`` (dataset "d"); sizes and inode counts, peak included."""
    import histokt.ingest.finalize as F
    from histokt.ingest.standardize import StandardizeConfig, standardize

    shutil.rmtree(store, ignore_errors=True)
    staging_root = store.parent / f".{store.name}.staging"
    shutil.rmtree(staging_root, ignore_errors=True)
    found: dict = {}
    original = F._swap_in

    def counted(store_, name, out, staging):
        found["peak"] = {
            "store": footprint(store),
            "staging": footprint(staging_root),
            "parts": footprint(out.parent / "parts"),
        }
        return original(store_, name, out, staging)

    F._swap_in = counted
    try:
        before, t0 = load(), time.perf_counter()
        result = standardize(
            StandardizeConfig(
                dataset="folder", raw=raw, store=store, name="d", mpp=mpp, workers=workers, progress=False
            )
        )
        wall = time.perf_counter() - t0
    finally:
        F._swap_in = original
    if result.status != "written" or result.counts is None:
        raise SystemExit(f"standardize did not write the dataset: {result}")
    dataset = store / "d"
    attrs = json.loads((dataset / "zarr.json").read_text())["attributes"]
    shard_files = [p for split in result.counts for p in (dataset / split / "images").glob("c.*")]
    shards = {
        "files": len(shard_files),
        "size": sum(p.stat().st_size for p in shard_files),
        "allocated": sum(p.stat().st_blocks * 512 for p in shard_files),
    }
    meta = json.loads((dataset / "train" / "images" / "zarr.json").read_text())
    peak = found["peak"]
    return {
        "patches": sum(result.counts.values()),
        "counts": result.counts,
        "rejected": result.rejected,
        "content_size": attrs["content_size"],
        "patch_size": attrs["patch_size"],
        "codecs": meta["codecs"],
        "shards": shards,
        "dataset": footprint(dataset),
        "peak": peak,
        "peak_inodes": peak["store"]["inodes"] + peak["staging"]["inodes"],
        "wall_s": wall,
        "load": before,
    }


def codec_text(codecs: list) -> str:
    conf = codecs[0]["configuration"]
    inner = " + ".join(c["name"] for c in conf["codecs"])
    return (
        f"{codecs[0]['name']}: {inner} per patch, {conf['chunk_shape'][1]}x{conf['chunk_shape'][2]} px; no compression"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    data = args.data.resolve()
    if not (data / "nct-crc-he-samples").is_dir() or not (data / "lc25000-lung").is_dir():
        print(
            f"skipped: the real tissue tiles are not at {data} (nct-crc-he-samples, lc25000-lung, "
            f"kather2016-samples; see ../shared/data/README.md): pass --data DIR",
            file=sys.stderr,
        )
        return 0
    work = args.work.resolve()
    info = machine_info()
    print(f"machine: {info['cpu_count']} CPUs, load average {info['loadavg_at_start']}", file=sys.stderr)
    results = []
    for kind in args.kinds:
        mpp = KINDS[kind][0]
        store = work / "stores" / f"{kind}.zarr"
        tiny = standardize_counted(raw_folder(data, work, kind, TINY), store, mpp, args.workers)
        for n in sorted(args.sizes):
            r = standardize_counted(raw_folder(data, work, kind, n), store, mpp, args.workers)
            r.update(kind=kind, images=n, mpp=mpp, fixed=tiny["dataset"]["inodes"], fixed_peak=tiny["peak_inodes"])
            results.append(r)
            print(
                f"  {kind}, {n} images: {r['patches']} patches of {r['content_size']} content in {r['wall_s']:.1f} s "
                f"(load {r['load'][0]})",
                file=sys.stderr,
                flush=True,
            )
        shutil.rmtree(store, ignore_errors=True)

    print(f"\n### store size, format histokt-patches/2 ({info['date'][:10]}, real tissue from {data})\n")
    rows = []
    for r in results:
        n = r["patches"]
        rows.append(
            [
                r["kind"],
                n,
                "x".join(map(str, r["content_size"])),
                r["shards"]["size"] / n,
                r["shards"]["allocated"] / n,
                r["dataset"]["allocated"] / n,
                r["shards"]["files"],
                r["dataset"]["inodes"],
                (r["dataset"]["inodes"] - r["fixed"]) / n * 10_000,
                r["peak_inodes"],
                (r["peak_inodes"] - r["fixed_peak"]) / n * 10_000,
                r["wall_s"],
            ]
        )
    for kind in args.kinds:  # format 1's fixed layout, for reference
        rows.append(
            [
                f"{kind}, format 1",
                "-",
                "272x272",
                FORMAT1_BYTES,
                FORMAT1_ALLOCATED,
                "-",
                "-",
                "-",
                40_000,
                "-",
                "-",
                "-",
            ]
        )
    print(
        markdown_table(
            [
                "input",
                "patches",
                "content px",
                "shard bytes/patch (st_size)",
                "shard bytes/patch (allocated)",
                "dataset bytes/patch (allocated)",
                "shard files",
                "dataset inodes",
                "per 10k beyond fixed",
                "peak inodes",
                "peak per 10k beyond fixed",
                "standardize s",
            ],
            rows,
        )
    )
    print()
    for kind in args.kinds:
        mine = [r for r in results if r["kind"] == kind]
        print(
            f"- {kind}: codec {codec_text(mine[0]['codecs'])}; fixed part (a dataset of {TINY} images): "
            f"{mine[0]['fixed']} inodes, {mine[0]['fixed_peak']} at the peak"
        )
        if len(mine) >= 2:
            a, b = mine[0], mine[-1]
            dp = b["patches"] - a["patches"]
            print(
                f"  growth from {a['patches']:,} to {b['patches']:,} patches: "
                f"{(b['dataset']['inodes'] - a['dataset']['inodes']) / dp * 10_000:.1f} dataset inodes and "
                f"{(b['peak_inodes'] - a['peak_inodes']) / dp * 10_000:.1f} peak inodes per 10,000 patches"
            )
    path = write_results(
        args.out,
        {
            "benchmark": "store_size",
            "format": "histokt-patches/2",
            "machine": info,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": results,
        },
    )
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
