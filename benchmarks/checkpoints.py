"""Checkpoint writes and bytes written by training cells, before and after the wall-time checkpoint policy.

    .venv/bin/python benchmarks/checkpoints.py [--work DIR] [--epochs 5] [--rate 5000] [--eval-rate R]

Before: a full checkpoint (last.pt: weights, optimizer state, RNGs) at the end of every epoch, on top of the
10-minute timer (which each epoch's save restarted). After: the timer only (``ckpt_every_min``, 10 minutes of
wall time), a stop signal, and at the end the weights-only final.pt. best.pt (weights only, written when the
validation improves) is the same under both.

(a) demo: one training cell on the tests' toy store (tests/fixtures/trainstore.py: 38 train patches, batch 8,
    5 steps an epoch), ResNet18 on the CPU, --epochs epochs, run twice: "before" with ``ckpt_every_steps`` =
    the steps of an epoch (a checkpoint as each epoch ends, as the loop did) and "after" with the defaults.
    Every write is counted, with its bytes, by wrapping histokt.train.checkpoint's save functions; the two
    runs' final weights are compared bit for bit.
(b) paper: jobs/paper.toml expanded with histokt.study.plan.expand; per training cell its epochs, batch size
    and steps per epoch (from the train patches per dataset below: the docstrings' and cards' image counts
    and geometry, stated as assumptions where the count is not published), the full checkpoint size of its
    mode and optimizer (measured: a ResNet18 with its optimizer state after one step, saved as the loop
    saves it), and the wall time of an epoch at --rate training images/s (default 5,000: the README's H100
    row, bf16, 8 workers) plus validation at --eval-rate (default: the same rate, which overstates the time
    and so the timer's saves). The 10-minute timer then gives floor(cell minutes / 10) saves per cell.

Measured and computed, never asserted: the tables are printed and written to benchmarks/results/checkpoints.json.
"""

import argparse
import io
import math
import os
import sys
import tempfile
import time
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import machine_info, markdown_table, write_results  # noqa: E402

MB, TB = 1e6, 1e12

# Train and valid patches per dataset at 1 µm/px, 272 px windows (stride 204, BCSS 68), as histokt standardizes
# them; where the count is not published it is derived from the image count and size, and says so.
DATASETS = {
    # name: (classes, train patches, valid patches, where the numbers come from)
    "adp": (33, 14134, 1767, "official splits (histokt/ingest/cards/adp.py expected_counts)"),
    "mhist": (2, 1740, 435, "2,175 official train images (224 px at 1.25 µm/px: 1 patch) cut 80/20"),
    "bach": (4, 960, 240, "400 photos 2048x1536 at 0.42 µm/px -> 860x645 px: 3x2 windows; 40/10/50"),
    "ajlymph": (3, 299, 37, "374 images 1388x1040 at 0.25 µm/px -> 347x260 px, padded: 1 window; 80/10/10"),
    "pcam": (2, 2000, 400, "per_class = 1000: 1,000 per class train, 200 per class valid (cards/pcam.py)"),
    "crc": (7, 14000, 1750, "per_class = 2000: 2,000/250 per class over 7 classes (docs/method.md §1)"),
    "glas": (2, 136, 34, "85 train images 775x522 at 0.62 µm/px -> 481x324 px: 2 windows; 80/20 (assumed)"),
    "os": (4, 14643, 1830, "1,144 tiles 1024x1024 at 1 µm/px: 4x4 windows = 18,304; 80/10/10"),
    "bcss": (
        10,
        17395,
        2174,
        "151 ROIs, assumed ~1.1 mm² each (~1,050 px square): 12x12 windows at stride 68; 80/10/10",
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(tempfile.gettempdir()) / "histokt-bench" / "checkpoints"
    p.add_argument("--work", type=Path, default=default, help=f"where the toy store and the runs go ({default})")
    p.add_argument("--epochs", type=int, default=5, help="epochs of the demo cell (5)")
    p.add_argument("--rate", type=float, default=5000.0, help="training images/s of a paper cell (5000: H100)")
    p.add_argument("--eval-rate", type=float, default=None, help="validation images/s (default: --rate)")
    p.add_argument("--ckpt-every-min", type=float, default=10.0, help="the timer, minutes (10, the default)")
    return p.parse_args(argv)


# -- (a) the demo cell ----------------------------------------------------------------------------------------


def count_writes(writes: list):
    """Wrap histokt.train.checkpoint's save functions: each write appends (kind, bytes)."""
    from histokt.train import checkpoint

    save, save_weights = checkpoint.save, checkpoint.save_weights

    def counted_save(run_dir, state):
        save(run_dir, state)
        writes.append(("full", (Path(run_dir) / checkpoint.LAST).stat().st_size))

    def counted_weights(path, state):
        save_weights(path, state)
        writes.append((Path(path).stem, Path(path).stat().st_size))

    checkpoint.save, checkpoint.save_weights = counted_save, counted_weights
    return lambda: (setattr(checkpoint, "save", save), setattr(checkpoint, "save_weights", save_weights))


def demo(work: Path, epochs: int) -> dict:
    import shutil

    from histokt.train import checkpoint
    from histokt.train.config import TrainConfig
    from histokt.train.launch import train
    from tests.fixtures.trainstore import make_store

    store = work / "store.zarr"
    if not store.exists():
        make_store(work)
    batch = 8
    steps_per_epoch = math.ceil(38 / batch)
    runs = {}
    for policy, every_steps in (("before", steps_per_epoch), ("after", 0)):
        out = work / f"run-{policy}"
        shutil.rmtree(out, ignore_errors=True)
        writes: list = []
        restore = count_writes(writes)
        t = time.perf_counter()
        try:
            result = train(
                TrainConfig(
                    store=store,
                    dataset="toy",
                    out=out,
                    epochs=epochs,
                    batch_size=batch,
                    workers=0,
                    device="cpu",
                    progress=False,
                    eval_batch_size=16,
                    ckpt_every_steps=every_steps,
                )
            ).result
        finally:
            restore()
        assert result is not None
        runs[policy] = {
            "seconds": time.perf_counter() - t,
            "steps": result.steps,
            "full_writes": sum(1 for k, _ in writes if k == "full"),
            "full_bytes": sum(b for k, b in writes if k == "full"),
            "weights_writes": sum(1 for k, _ in writes if k != "full"),
            "weights_bytes": sum(b for k, b in writes if k != "full"),
            "final": checkpoint.load(out / "final.pt")["model"],
        }
        shutil.rmtree(out)  # ~90 MB of weights; the toy store stays for the next run
    import torch

    a, b = runs["before"].pop("final"), runs["after"].pop("final")
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {"epochs": epochs, "steps_per_epoch": steps_per_epoch, "same_final_weights": same, "runs": runs}


# -- (b) the paper study --------------------------------------------------------------------------------------


def paper_train_cells() -> list:
    """The training cells of jobs/paper.toml (the spec wants its raw folders: empty ones in a temp folder)."""
    from histokt.study import plan, spec

    path = ROOT / "jobs" / "paper.toml"
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        for d in tomllib.loads(path.read_text())["datasets"].values():
            (Path(tmp) / d["raw"]).mkdir(parents=True, exist_ok=True)
        os.chdir(tmp)
        try:
            cells = plan.expand(spec.load(path))
        finally:
            os.chdir(here)
    return [c for stage in cells.values() for c in stage if c.kind == "train"]


def checkpoint_bytes(mode: str, optimizer: str, classes: int) -> tuple[int, int, float]:
    """A ResNet18 cell's full checkpoint (as Trainer.save writes it, after one optimizer step: the optimizer
    state exists), its weights-only file (best.pt, final.pt), and the seconds checkpoint.save took here."""
    import torch

    from histokt import __version__
    from histokt.train import checkpoint
    from histokt.train.loop import fresh_state
    from histokt.train.models import build_model, freeze_encoder
    from histokt.train.optim import build_optimizer, build_scheduler

    torch.manual_seed(0)
    model = build_model("resnet18", classes, "random")
    if mode == "fine":
        freeze_encoder(model, "train")
    opt = build_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], 1e-3)
    sched = build_scheduler("step", opt, 20, 0.5)
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": None,
        "rng": checkpoint.rng_state(),
        "arch": "resnet18",
        "world_size": 1,
        "histokt_version": __version__,
        **fresh_state(),
    }
    full, weights = io.BytesIO(), io.BytesIO()
    torch.save(state, full)
    torch.save({"model": model.state_dict(), "epoch": 0, "valid_top1": 0.5, "arch": "resnet18"}, weights)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        checkpoint.save(Path(tmp), state)
        seconds = time.perf_counter() - t
    return len(full.getvalue()), len(weights.getvalue()), seconds


def paper(rate: float, eval_rate: float, every_min: float) -> dict:
    from histokt.train.config import TrainConfig

    defaults = TrainConfig(store=Path("."), dataset="", out=Path("."))
    sizes: dict = {}
    stages: dict = defaultdict(lambda: defaultdict(float))
    per_dataset: dict = {}
    kept: dict = defaultdict(float)
    cells = paper_train_cells()
    for cell in cells:
        a = cell.args
        name, mode = a["dataset"], a["mode"]
        classes, train_n, valid_n, _ = DATASETS[name]
        epochs = a.get("epochs", defaults.epochs)
        batch = a.get("batch_size", defaults.batch_size)
        optimizer = a.get("optimizer") or ("sgd" if mode == "scratch" else "adamp")
        every = a.get("ckpt_every_min", every_min)
        key = (mode, optimizer, classes)
        if key not in sizes:
            sizes[key] = checkpoint_bytes(*key)
        full, weights, _ = sizes[key]
        steps = math.ceil(train_n / batch)
        epoch_s = train_n / rate + valid_n / eval_rate
        cell_s = epochs * epoch_s
        before = epochs * (1 + math.floor(epoch_s / (60 * every)))  # the timer restarted at every epoch's save
        after = math.floor(cell_s / (60 * every))
        s = stages[cell.stage]
        s["cells"] += 1
        s["epochs"] += epochs
        s["steps"] += epochs * steps
        s["before_writes"] += before
        s["before_bytes"] += before * full
        s["after_writes"] += after
        s["after_bytes"] += after * full
        s["final_bytes"] += weights
        kept["default"] += 2 * weights
        kept["pretrain_best_only"] += weights if cell.stage == "pretrain" else 0
        s["cells_with_a_timed_save"] += after > 0
        per_dataset[name] = {
            "classes": classes,
            "train": train_n,
            "valid": valid_n,
            "steps_per_epoch": steps,
            "epoch_s": epoch_s,
            "cell_min": cell_s / 60,
            "timed_saves_per_cell": after,
            "source": DATASETS[name][3],
        }
    total = defaultdict(float)
    for s in stages.values():
        for k, v in s.items():
            total[k] += v
    measured = {
        f"{mode}/{opt}/{c} classes": {"full_mb": f / MB, "weights_mb": w / MB, "save_s": t}
        for (mode, opt, c), (f, w, t) in sorted(sizes.items())
    }
    return {
        "rate": rate,
        "eval_rate": eval_rate,
        "ckpt_every_min": every_min,
        "stages": {k: dict(v) for k, v in stages.items()},
        "total": dict(total),
        "per_dataset": per_dataset,
        "checkpoint_sizes": measured,
        "kept": dict(kept),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    d = demo(args.work, args.epochs)
    print(
        f"## (a) demo cell: toy store, ResNet18, CPU, {d['epochs']} epochs of {d['steps_per_epoch']} steps "
        f"(final weights bitwise equal: {d['same_final_weights']})\n"
    )
    rows = []
    for policy, r in d["runs"].items():
        full, weights = r["full_bytes"] / MB, r["weights_bytes"] / MB
        rows.append([policy, r["full_writes"], full, r["weights_writes"], weights, full + weights])
    head = ["policy", "last.pt writes", "MB", "best/final.pt writes", "MB", "MB in all"]
    print(markdown_table(head, rows))

    p = paper(args.rate, args.eval_rate or args.rate, args.ckpt_every_min)
    print(
        f"\n## (b) jobs/paper.toml: training cells at {p['rate']:,.0f} img/s training, {p['eval_rate']:,.0f} img/s "
        f"validation, a timed checkpoint every {p['ckpt_every_min']:g} min\n"
    )
    rows = []
    for name, s in [*p["stages"].items(), ("total", p["total"])]:
        rows.append(
            [
                name,
                int(s["cells"]),
                int(s["steps"]),
                int(s["before_writes"]),
                s["before_bytes"] / TB,
                int(s["after_writes"]),
                s["after_bytes"] / TB,
                int(s["cells_with_a_timed_save"]),
                s["final_bytes"] / TB,
            ]
        )
    head = ["stage", "cells", "steps", "before: writes", "TB", "after: writes", "TB", "cells timed", "final.pt TB"]
    print(markdown_table(head, rows))
    print(
        "\nbest.pt (weights only, on a better validation) is written alike under both policies, at most once an "
        "epoch; final.pt once a cell. Signals (preemption) add one full checkpoint each, under both."
    )
    print("\nweights kept when the cells are done (--keep), GB\n")
    k = p["kept"]
    rows = [
        ["best,final everywhere (the default)", k["default"] / 1e9],
        ["pretrain best, transfer and distill none", k["pretrain_best_only"] / 1e9],
    ]
    print(markdown_table(["keep", "GB"], rows))
    print("\nper dataset (assumptions: see the source column)\n")
    rows = [
        [
            n,
            r["classes"],
            r["train"],
            r["valid"],
            r["steps_per_epoch"],
            r["epoch_s"],
            r["cell_min"],
            r["timed_saves_per_cell"],
        ]
        for n, r in p["per_dataset"].items()
    ]
    head = ["dataset", "classes", "train", "valid", "steps/epoch", "epoch s", "cell min (250 ep)", "timed saves/cell"]
    print(markdown_table(head, rows))
    for n, r in p["per_dataset"].items():
        print(f"- {n}: {r['source']}")
    print("\nfull checkpoint sizes, measured (ResNet18 + optimizer state after one step, as Trainer.save writes it)\n")
    rows = [[k, v["full_mb"], v["weights_mb"], v["save_s"]] for k, v in p["checkpoint_sizes"].items()]
    print(markdown_table(["mode/optimizer/classes", "last.pt MB", "best.pt MB", "checkpoint.save s here"], rows))
    path = write_results("checkpoints", {"machine": info, "demo": d, "paper": p})
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
