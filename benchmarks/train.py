"""Training-loop benchmark: the full loop (store reader, augmentation, step, bookkeeping) against the same
model stepping on in-memory tensors, checkpoint save time, and process start to first resumed step.

    .venv/bin/python benchmarks/train.py                      # CPU, ~3 min on 2 cores
    python3 benchmarks/train.py --device cuda --batch-size 256 --images 8192 --workers 8   # a GPU node

Writes benchmarks/results/<--out>.json and prints markdown tables. Nothing here is asserted.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "histokt-bench-train")
    p.add_argument("--images", type=int, default=512, help="272 px synthetic patches in the train store (512)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (32)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (2)")
    p.add_argument("--epochs", type=int, default=2, help="timed full-loop epochs after one warm-up epoch (2)")
    p.add_argument("--memory-steps", type=int, default=0, help="in-memory steps (default: one epoch's worth)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default="train")
    p.add_argument("--child-resume", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


CLASSES = {"sparse": (4, 3), "medium": (15, 4), "dense": (35, 5)}


def write_tile(raw: Path, i: int) -> None:
    import numpy as np
    from PIL import Image

    from histokt.batch.demo import synthetic_tile

    name, (density, radius) = list(CLASSES.items())[i % 3]
    path = raw / name / f"{i:05d}.png"
    if not path.exists():
        tile = synthetic_tile(272, density, radius, np.random.default_rng((0, i)))
        Image.fromarray(tile).save(path, compress_level=1)


def make_store(work: Path, n: int) -> Path:
    """Synthetic 272 px tissue patches, 3 classes, standardized once and cached."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from histokt.ingest.standardize import StandardizeConfig, standardize

    store = work / f"store-{n}.zarr"
    if (store / "bench").is_dir():
        return store
    raw = work / f"raw-{n}"
    for name in CLASSES:
        (raw / name).mkdir(parents=True, exist_ok=True)
    procs = os.cpu_count() or 1
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(partial(write_tile, raw), range(n), chunksize=64))
    standardize(
        StandardizeConfig(dataset="folder", raw=raw, store=store, name="bench", mpp=1.0, workers=procs, progress=False)
    )
    return store


def config(args, store: Path, out: Path):
    from histokt.train.config import TrainConfig

    return TrainConfig(
        store=store,
        dataset="bench",
        out=out,
        arch=args.arch,
        epochs=1000,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        optimizer="sgd",
        lr=0.01,
        progress=False,
        ckpt_every_min=0,
    )


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(args, store: Path) -> dict:
    import torch

    from histokt.train import distributed
    from histokt.train.config import resolved
    from histokt.train.launch import device_for
    from histokt.train.loop import Trainer
    from histokt.train.rundir import prepare_run_dir
    from histokt.train.signals import StopRequested

    out = args.work / "run"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cfg = resolved(config(args, store, out))
    world = distributed.World()
    device = device_for(cfg, world)
    prepare_run_dir(cfg)
    trainer = Trainer(cfg, world, device)
    trainer.t0 = trainer.last_save = time.time()
    steps_per_epoch = len(trainer.sampler)
    with StopRequested() as stop:
        trainer.train_epoch(0, stop)  # warm-up: workers start, kernels autotune, compile
        sync(device)
        t = time.perf_counter()
        for epoch in range(1, 1 + args.epochs):
            trainer.state["batch"] = 0
            trainer.train_epoch(epoch, stop)
        sync(device)
        loop_s = time.perf_counter() - t
    loop_images = args.epochs * steps_per_epoch * args.batch_size

    # the same steps on tensors already in memory (on the device): the ceiling the loader should reach
    n_mem = args.memory_steps or steps_per_epoch
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 272, 272, 3), dtype=torch.uint8, generator=g)
    images = images.to(device).permute(0, 3, 1, 2)
    labels = torch.randint(0, 3, (args.batch_size,), generator=g).to(device)
    for _ in range(3):
        trainer.step(images, labels)
    sync(device)
    t = time.perf_counter()
    for _ in range(n_mem):
        trainer.step(images, labels)
    sync(device)
    mem_s = time.perf_counter() - t

    saves = []
    for _ in range(3):
        t = time.perf_counter()
        trainer.save()
        saves.append(time.perf_counter() - t)
    size_mb = (out / "last.pt").stat().st_size / 2**20

    print(
        f"full loop {loop_images / loop_s:.1f} img/s, in memory {n_mem * args.batch_size / mem_s:.1f} img/s",
        file=sys.stderr,
        flush=True,
    )
    # process start -> first resumed step, in a fresh interpreter
    t = time.time()
    child = subprocess.run(
        [sys.executable, __file__, "--child-resume", str(out), *child_args(args)],
        capture_output=True,
        text=True,
        check=True,
    )
    first_step_at = float(child.stdout.strip().splitlines()[-1])
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "amp_bf16": trainer.amp,
        "channels_last": trainer.memory_format == torch.channels_last,
        "steps_per_epoch": steps_per_epoch,
        "full_loop": {"images": loop_images, "seconds": loop_s, "images_per_s": loop_images / loop_s},
        "in_memory": {
            "images": n_mem * args.batch_size,
            "seconds": mem_s,
            "images_per_s": n_mem * args.batch_size / mem_s,
        },
        "checkpoint_save_s": min(saves),
        "checkpoint_mb": size_mb,
        "start_to_first_resumed_step_s": first_step_at - t,
    }


def child_args(args):
    return [
        "--images",
        str(args.images),
        "--batch-size",
        str(args.batch_size),
        "--arch",
        args.arch,
        "--device",
        args.device,
        "--workers",
        str(args.workers),
        "--precision",
        args.precision,
        "--work",
        str(args.work),
    ] + (["--compile"] if args.compile else [])


def child_resume(args) -> None:
    """Resume the benchmark's run directory and print the wall clock after the first step."""
    from histokt.train import distributed
    from histokt.train.config import resolved
    from histokt.train.launch import device_for
    from histokt.train.loop import Trainer

    store = args.work / f"store-{args.images}.zarr"
    cfg = resolved(config(args, store, args.child_resume))
    device = device_for(cfg, distributed.World())
    trainer = Trainer(cfg, distributed.World(), device)
    assert trainer.state["step"] > 0, "nothing was resumed"
    trainer.step(*next(iter(trainer.loader)))  # (images, labels) or (images, labels, augmentation draws)
    sync(device)
    print(time.time())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_resume:
        child_resume(args)
        return 0
    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    store = make_store(args.work, args.images)
    r = measure(args, store)
    ratio = r["full_loop"]["images_per_s"] / r["in_memory"]["images_per_s"]
    r["ratio"] = ratio
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(
        f"\n### training loop: {args.arch}, batch {args.batch_size}, 272 px, {r['device']}"
        f"{' (' + r['gpu'] + ')' if r['gpu'] else ''}, bf16 {r['amp_bf16']}, workers {args.workers} "
        f"({info['date']}, {info['cpu_count']} CPUs)\n"
    )
    print("| measure | value |\n|---|---:|")
    print(f"| full loop (store → augment → step), images/s | {r['full_loop']['images_per_s']:.1f} |")
    print(f"| same steps on in-memory tensors, images/s | {r['in_memory']['images_per_s']:.1f} |")
    print(f"| ratio (goal on CPU ≥ 90 %) | {100 * ratio:.1f} % |")
    print(f"| checkpoint save (last.pt, {r['checkpoint_mb']:.0f} MB), s | {r['checkpoint_save_s']:.3f} |")
    print(f"| process start → first resumed step, s | {r['start_to_first_resumed_step_s']:.2f} |")
    path = ROOT / "benchmarks" / "results" / f"{args.out}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "train", "machine": info, "result": r}, indent=1) + "\n")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
