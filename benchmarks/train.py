"""Training-loop benchmark: the full loop (batches from the store, augmentation, step, bookkeeping) against
the same steps on a batch already in device memory, each over a steady-state window; checkpoint save time;
process start to first resumed step; a whole small cell's wall time.

    .venv/bin/python benchmarks/train.py                                   # CPU, ~2 min on 2 cores
    python3 benchmarks/train.py --device cuda --batch-size 256 --images 2048 --seconds 20    # a GPU node
    python3 benchmarks/train.py --device cuda --content 93 ...             # PCam-like content, padded on the device
    python3 benchmarks/train.py --device cuda --memory-only --compile ...  # the step alone, for settings
    python3 benchmarks/train.py --device cuda --cell 10 --images 3152 ...  # a whole cell: histokt train, 10 epochs

Both sides of the ratio run the same Trainer with the same settings (batch, precision, compile,
channels_last) and the same device work: the in-memory side steps on one fixed batch with the same warp
draws, so what the ratio measures is the time the device waits for batches. Each side runs a warm-up (a whole
epoch, which starts the workers, loads the split to the device, compiles), then whole epochs (or groups of
16 steps) until --seconds of steady state have passed. Writes benchmarks/results/<--out>.json (date, device,
GPU name, torch version, the settings, both rates and their ratio) as soon as it is measured.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "histokt-bench-train")
    p.add_argument("--images", type=int, default=512, help="synthetic images in the store (512; 70 %% train)")
    p.add_argument("--content", type=int, default=272, help="content size, padded to 272 px on read (272)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (32)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, on the loader path (2)")
    p.add_argument("--data-on", default="auto", help="auto, device or loader (histokt train --data-on)")
    p.add_argument("--seconds", type=float, default=20.0, help="steady-state window of each side (20)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--memory-only", action="store_true", help="only the in-memory steps (settings comparisons)")
    p.add_argument("--no-resume", action="store_true", help="skip the checkpoint and resume timings")
    p.add_argument("--cell", type=int, default=0, help="instead: a whole cell of N epochs, histokt train")
    p.add_argument("--cell-args", default="", help="more histokt train options for --cell (e.g. '--data-on loader')")
    p.add_argument("--out", default="train")
    p.add_argument("--child-resume", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


CLASSES = {"sparse": (4, 3), "medium": (15, 4), "dense": (35, 5)}


def write_tile(raw: Path, size: int, i: int) -> None:
    import numpy as np
    from PIL import Image

    from histokt.batch.demo import synthetic_tile

    name, (density, radius) = list(CLASSES.items())[i % 3]
    path = raw / name / f"{i:05d}.png"
    if not path.exists():
        tile = synthetic_tile(size, density, radius, np.random.default_rng((0, i)))
        Image.fromarray(tile).save(path, compress_level=1)


def store_path(args) -> Path:
    return args.work / (f"store-{args.images}" + ("" if args.content == 272 else f"-c{args.content}") + ".zarr")


def make_store(args) -> Path:
    """Synthetic tissue images of --content px, 3 classes, standardized to 272 px patches once and cached."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from histokt.ingest.standardize import StandardizeConfig, standardize

    store = store_path(args)
    if (store / "bench").is_dir():
        return store
    raw = store.with_name(store.name.replace("store-", "raw-").removesuffix(".zarr"))
    for name in CLASSES:
        (raw / name).mkdir(parents=True, exist_ok=True)
    procs = os.cpu_count() or 1
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(partial(write_tile, raw, args.content), range(args.images), chunksize=64))
    standardize(
        StandardizeConfig(
            dataset="folder", raw=raw, store=store, name="bench", mpp=1.0, workers=procs, progress=False, stride=272
        )
    )
    return store


def config(args, store: Path, out: Path, epochs: int = 1000):
    from histokt.train.config import TrainConfig

    return TrainConfig(
        store=store,
        dataset="bench",
        out=out,
        arch=args.arch,
        epochs=epochs,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        data_on=args.data_on,
        optimizer="sgd",
        lr=0.01,
        progress=False,
        ckpt_every_min=0,
    )


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def steady(run, seconds: float, device) -> tuple[int, float]:
    """Call ``run`` (returns images done) until ``seconds`` of wall time have passed: (images, seconds)."""
    sync(device)
    t, images = time.perf_counter(), 0
    while True:
        images += run()
        sync(device)
        if time.perf_counter() - t >= seconds:
            return images, time.perf_counter() - t


def measure(args, store: Path) -> dict:
    import torch

    from histokt.train import distributed
    from histokt.train.config import resolved
    from histokt.train.launch import device_for
    from histokt.train.loop import Trainer
    from histokt.train.rundir import prepare_run_dir
    from histokt.train.signals import StopRequested

    out = args.work / "run"
    shutil.rmtree(out, ignore_errors=True)
    cfg = resolved(config(args, store, out))
    world = distributed.World()
    device = device_for(cfg, world)
    prepare_run_dir(cfg)
    t = time.perf_counter()
    trainer = Trainer(cfg, world, device)  # loads the splits to the device where they go there
    build_s = time.perf_counter() - t
    trainer.t0 = trainer.last_save = time.time()
    steps_per_epoch = len(trainer.sampler)
    r: dict = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "settings": dict(trainer.settings),
        "data_on_device": trainer.resident,
        "channels_last": trainer.memory_format == torch.channels_last,
        "content": args.content,
        "batch_size": args.batch_size,
        "steps_per_epoch": steps_per_epoch,
        "trainer_build_s": build_s,
    }
    with StopRequested() as stop:
        epoch = [0]

        def one_epoch() -> int:
            trainer.state["batch"] = 0
            trainer.train_epoch(epoch[0], stop)
            epoch[0] += 1
            return steps_per_epoch * args.batch_size

        if not args.memory_only:
            one_epoch()  # warm-up: workers start and fill their queues, the splits are on the device
            images, seconds = steady(one_epoch, args.seconds, device)
            r["full_loop"] = {"images": images, "seconds": seconds, "images_per_s": images / seconds}
        # then the same steps on one batch already on the device, with the loop's warp draws; made in this
        # process, so that no loader worker is busy while they are timed
        keys = next(iter(trainer.sampler))
        loader = trainer.loader
        batch = loader.split.batch(keys) if trainer.resident else loader.dataset.__getitems__(keys)
        fixed = tuple(x.to(device) for x in batch)
        group = 16 if device.type == "cuda" else 1  # steps between syncs while timing

        def memory_steps() -> int:
            for _ in range(group):
                trainer.step(*fixed)
            return group * args.batch_size

        memory_steps()  # warm-up (compile, autotune)
        window = max(args.seconds, r["full_loop"]["seconds"] if "full_loop" in r else 0)  # both sides alike
        images, seconds = steady(memory_steps, window, device)
        r["in_memory"] = {"images": images, "seconds": seconds, "images_per_s": images / seconds}
        if "full_loop" in r:
            r["ratio"] = r["full_loop"]["images_per_s"] / r["in_memory"]["images_per_s"]
    if args.no_resume or args.memory_only:
        return r
    saves = []
    for _ in range(3):
        t = time.perf_counter()
        trainer.save()
        saves.append(time.perf_counter() - t)
    r["checkpoint_save_s"] = min(saves)
    r["checkpoint_mb"] = (out / "last.pt").stat().st_size / 2**20
    t = time.time()  # process start -> first resumed step, in a fresh interpreter
    child = subprocess.run(
        [sys.executable, __file__, "--child-resume", str(out), *child_args(args)],
        capture_output=True,
        text=True,
        check=True,
    )
    r["start_to_first_resumed_step_s"] = float(child.stdout.strip().splitlines()[-1]) - t
    return r


def child_args(args):
    flags = ["--images", str(args.images), "--content", str(args.content), "--batch-size", str(args.batch_size)]
    flags += ["--arch", args.arch, "--device", args.device, "--workers", str(args.workers)]
    flags += ["--precision", args.precision, "--data-on", args.data_on, "--work", str(args.work)]
    return flags + (["--compile"] if args.compile else [])


def child_resume(args) -> None:
    """Resume the benchmark's run directory and print the wall clock after the first step."""
    from histokt.train import distributed
    from histokt.train.config import resolved
    from histokt.train.launch import device_for
    from histokt.train.loop import Trainer

    cfg = resolved(config(args, store_path(args), args.child_resume))
    device = device_for(cfg, distributed.World())
    trainer = Trainer(cfg, distributed.World(), device)
    assert trainer.state["step"] > 0, "nothing was resumed"
    trainer.step(*next(iter(trainer.loader)))  # (images, labels) or (images, labels, augmentation draws)
    sync(device)
    print(time.time())


def whole_cell(args, store: Path) -> dict:
    """``histokt train`` of a fresh cell for --cell epochs, start to exit, as a sweep runs it."""
    import shlex

    out = args.work / "cell"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "histokt", "train", "--store", str(store), "--dataset", "bench", "--out", str(out)]
    cmd += ["--epochs", str(args.cell), "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    cmd += ["--device", args.device, "--precision", args.precision, "--data-on", args.data_on, "--no-progress"]
    cmd += (["--compile"] if args.compile else []) + shlex.split(args.cell_args)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t
    result = json.loads((out / "result.json").read_text())
    return {
        "epochs": args.cell,
        "train_patches": int(json.loads((store / "bench" / "zarr.json").read_text())["attributes"]["counts"]["train"]),
        "wall_s": wall,
        "training_s": result["seconds"],
        "settings": result.get("settings"),
        "command": shlex.join(cmd[1:]),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_resume:
        child_resume(args)
        return 0
    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    store = make_store(args)
    r = whole_cell(args, store) if args.cell else measure(args, store)
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    path = ROOT / "benchmarks" / "results" / f"{args.out}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "train", "machine": info, "result": r}, indent=1) + "\n")
    if args.cell:
        print(f"| whole cell, {args.cell} epochs | {r['train_patches']} patches | {r['wall_s']:.1f} s wall |")
    else:
        print(
            f"\n### {args.arch}, batch {args.batch_size}, {args.content} px content, {r['device']}"
            f"{' (' + r['gpu'] + ')' if r['gpu'] else ''}, {r['settings']}, data on device {r['data_on_device']}, "
            f"workers {args.workers} ({info['date']}, torch {info['torch']})\n"
        )
        print("| measure | value |\n|---|---:|")
        if "full_loop" in r:
            print(f"| full loop, images/s ({r['full_loop']['seconds']:.0f} s) | {r['full_loop']['images_per_s']:.1f} |")
        print(
            f"| in-memory steps, images/s ({r['in_memory']['seconds']:.0f} s) | {r['in_memory']['images_per_s']:.1f} |"
        )
        if "ratio" in r:
            print(f"| ratio | {100 * r['ratio']:.1f} % |")
        if "checkpoint_save_s" in r:
            print(f"| checkpoint save (last.pt, {r['checkpoint_mb']:.0f} MB), s | {r['checkpoint_save_s']:.3f} |")
            print(f"| process start → first resumed step, s | {r['start_to_first_resumed_step_s']:.2f} |")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
