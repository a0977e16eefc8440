"""The paper study as one task per cell and as pools of GPU workers (``sweep --pool``): what each asks of a
cluster, and where the GPU time goes.

    bash slurm/local/start.sh              # for the job-start measurement (skipped without a cluster)
    .venv/bin/python benchmarks/pool.py [--spec jobs/paper.toml] [--pools 16,64] [--throughput 5000]
                                        [--image histokt.sif] [--idle-min 10]

1. **One job start, measured** on the local SLURM cluster: from the batch script's first line to a process
   that has imported torch and histokt's training loop (what a training cell pays before its first step;
   scheduling latency is the cluster's and not counted), on the host and, with ``--image``, through
   ``apptainer exec`` of the image.
2. **The GPU cells of the plan, simulated** with the cost model's estimate of each cell (``histokt.batch.cost``:
   images / throughput): one task per cell (every cell pays a job start; at most ``array_parallelism`` at
   once) and pools of W workers (each worker pays one start; a worker takes the ready cell that unblocks the
   most others, waits for inputs at most ``--idle-min`` minutes and then leaves). Merges are taken to come
   2 minutes after their Stage-A models (CPU pool). Reported: jobs submitted, task-hours requested (walltime
   asked: per cell, or per worker) and estimated, the makespan, GPU-hours held, idle worker time (waiting for
   inputs and at the end) and the share of GPU time lost to job starts.

Writes benchmarks/results/pool.json.
"""

import argparse
import heapq
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import machine_info, markdown_table, write_results  # noqa: E402

PROBE = "import torch, histokt.train.loop, histokt.batch.cellrun"
MERGE_S = 120.0


def job_start_s(prefix: str, work: Path) -> float | None:
    """Seconds from a batch script's start to a Python that has imported torch and histokt, on the cluster."""
    out = work / f"start-{abs(hash(prefix))}.txt"
    script = work / "start.sh"
    script.write_text(
        f"#!/bin/bash\nt0=$(date +%s.%N)\n{prefix} python -c '{PROBE}'\nt1=$(date +%s.%N)\necho \"$t0 $t1\" > {out}\n"
    )
    try:
        r = subprocess.run(["sbatch", "--parsable", "-c", "1", "--mem=2G", "-o", "/dev/null", script],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    end = time.time() + 600
    while not out.exists() and time.time() < end:
        time.sleep(0.5)
    if not out.exists():
        return None
    t0, t1 = map(float, out.read_text().split())
    return t1 - t0


def gpu_cells(spec, throughput: float):
    """[(cell id, seconds, time_min, [input cell ids])] of the GPU cells, inputs limited to GPU cells (a
    merge stands for its Stage-A models, 2 minutes later)."""
    from histokt.batch.cost import dataset_counts
    from histokt.batch.inputs import Inputs
    from histokt.batch.sweep import resources
    from histokt.study import plan
    from histokt.train.config import TrainConfig

    cells = plan.expand(spec)
    root = Path(tempfile.gettempdir()) / "histokt-pool-bench"
    inputs = Inputs(root, cells)
    counts = dataset_counts(spec)
    default_epochs = int(TrainConfig.__dataclass_fields__["epochs"].default)  # type: ignore[arg-type]
    by_id = {c.id: c for cs in cells.values() for c in cs}
    out, merge_inputs = [], {}
    for c in cells.get("merge", []):
        merge_inputs[c.id] = sorted(inputs.needs(c))
    for stage in ("pretrain", "transfer", "distill"):
        for c in cells.get(stage, []):
            n = counts[plan.cell_dataset(c)] or {}
            epochs = int(c.args.get("epochs", default_epochs))
            seconds = (epochs * (n.get("train", 0) + n.get("valid", 0)) + n.get("test", 0)) / throughput
            reads = []
            for p in sorted(inputs.needs(c)):
                if by_id[p].stage == "merge":
                    reads += [f"{p}+merge:{q}" for q in merge_inputs[p]]
                elif by_id[p].stage != "standardize":
                    reads.append(p)
            r = resources(spec, stage, plan.cell_dataset(c))
            out.append((c.id, seconds, r.time_min, reads, r.array_parallelism))
    return out


def simulate(cells, workers: int | None, start_s: float, idle_s: float) -> dict:
    """List scheduling of the GPU cells on ``workers`` pool workers, or one task per cell (None: at most
    ``array_parallelism`` at once, each paying ``start_s``). A read of ``<merge>+merge:<A>`` is ready
    MERGE_S after A is done. A worker that would wait longer than ``idle_s`` for a cell leaves."""
    dur = {c: sec for c, sec, *_ in cells}
    reads = {c: [r.split("+merge:")[-1] for r in rs] for c, _, _, rs, _ in cells}
    delay = {c: MERGE_S if any("+merge:" in r for r in rs) else 0.0 for c, _, _, rs, _ in cells}
    readers: dict[str, int] = {}
    for rs in reads.values():
        for r in rs:
            readers[r] = readers.get(r, 0) + 1
    order = {c: k for k, (c, *_) in enumerate(cells)}
    rank = {c: (-readers.get(c, 0), order[c]) for c in dur}
    done_at: dict[str, float] = {}
    left = set(dur)
    slots = workers or max(p for *_, p in cells)
    first = start_s if workers else 0.0
    free = [(first, w) for w in range(slots)]  # (when the worker or slot is free, which)
    heapq.heapify(free)
    busy = 0.0
    exits: list[float] = []
    while left:
        now, w = heapq.heappop(free)
        known = [(max(now, max([done_at[r] for r in reads[c]], default=0.0) + delay[c]), rank[c], c)
                 for c in left if all(r in done_at for r in reads[c])]  # fmt: skip
        if not known:  # what is left reads cells not started yet: wait for the next one to start
            nxt = min((t for t, _ in free), default=now)
            if workers and nxt - now > idle_s:
                exits.append(now + idle_s)
                continue
            heapq.heappush(free, (max(nxt, now + 1e-6), w))
            continue
        t, _, c = min(known, key=lambda k: (k[0] > now, k[0] if k[0] > now else 0, k[1]))
        if workers and t - now > idle_s:
            exits.append(now + idle_s)
            continue
        begin = t if workers else t + start_s
        done_at[c] = begin + dur[c]
        busy += dur[c]
        left.discard(c)
        heapq.heappush(free, (done_at[c], w))
    makespan = max(done_at.values())
    jobs = workers or len(cells)
    if workers:
        exits += [t for t, _ in free]
        held = sum(min(t, makespan) for t in exits)
    else:
        held = busy + jobs * start_s
    lost = jobs * start_s
    return {
        "jobs": jobs,
        "makespan_h": round(makespan / 3600, 2),
        "gpu_h_busy": round(busy / 3600, 1),
        "gpu_h_held": round(held / 3600, 1),
        "idle_gpu_h": round(max(0.0, held - busy - lost) / 3600, 1),
        "start_lost_share": round(lost / (busy + lost), 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", type=Path, default=ROOT / "jobs" / "paper.toml")
    ap.add_argument("--pools", default="16,64")
    ap.add_argument("--throughput", type=float, default=5000.0)
    ap.add_argument("--image", type=Path, default=None)
    ap.add_argument("--idle-min", type=float, default=10.0)
    args = ap.parse_args()
    from histokt.batch import pool
    from histokt.batch.sweep import resources
    from histokt.study.spec import load

    spec = load(args.spec)
    work = Path(tempfile.mkdtemp(prefix="histokt-pool-bench-"))
    host = job_start_s("", work)
    image = job_start_s(f"apptainer exec --env PYTHONPATH= {args.image.resolve()}", work) if args.image else None
    start = max(x for x in (host, image, 10.0) if x is not None)  # a real GPU node adds CUDA init: >= 10 s
    cells = gpu_cells(spec, args.throughput)
    asked_cells = sum(t for _, _, t, *_ in cells) / 60
    rows, result = [], {"job_start_s": {"host": host, "image": image, "simulated": start}}
    one = simulate(cells, None, start, args.idle_min * 60)
    label = f"one task per cell (<= {max(p for *_, p in cells)} at once)"
    rows.append([label, one["jobs"], f"{asked_cells:,.0f}", one["gpu_h_busy"], one["makespan_h"],
                 one["gpu_h_held"], 0, f"{100 * one['start_lost_share']:.2f} %"])  # fmt: skip
    result["one_task_per_cell"] = {**one, "task_h_asked": round(asked_cells, 1)}
    time_min = max(pool.DEFAULT_TIME_MIN, max(resources(spec, s).time_min for s in ("pretrain", "transfer")))
    for w in (int(x) for x in args.pools.split(",")):
        sim = simulate(cells, w, start, args.idle_min * 60)
        # each worker asks for time_min per allocation, and requeues itself until the study is done
        asked = w * time_min / 60 * math.ceil(sim["makespan_h"] / (time_min / 60))
        rows.append([f"pool of {w}", w, f"{asked:,.0f}", sim["gpu_h_busy"], sim["makespan_h"],
                     sim["gpu_h_held"], sim["idle_gpu_h"], f"{100 * sim['start_lost_share']:.2f} %"])  # fmt: skip
        result[f"pool_{w}"] = {**sim, "task_h_asked": asked}
    result.update(machine=machine_info(), spec=str(args.spec), throughput=args.throughput, gpu_cells=len(cells))
    head = ["plan", "GPU jobs", "task-h asked", "GPU-h est.", "makespan h", "GPU-h held", "idle GPU-h", "starts"]
    print(markdown_table(head, rows))
    print(f"\njob start (batch script -> torch, histokt imported): host {host} s, image {image} s; simulated {start} s")
    print(f"wrote {write_results('pool', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
