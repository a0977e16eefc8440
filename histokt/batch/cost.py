"""What a study will cost, before anything is submitted: `histokt sweep SPEC --dry-run`.

Per stage: cells, job arrays, waves under the queue budget, the GPU-hours SLURM is asked for (walltime x
GPUs x cells), an estimate of the GPU-hours really used, the bytes written and the files (inodes) left
behind. Nothing here reads raw data or imports torch: a study is costed before anything is downloaded.

The estimate of a training cell: epochs x (train + valid patches) + the test patches once, at a throughput
in images per second (``--throughput``; default ``IMG_PER_S``, the full training loop on one H100 in
bf16, README "Benchmarks"). A dataset's patches are its counts in the store where it is standardized, else
the spec's ``[datasets.X] patches`` estimate (cut 80/10/10), else unknown (its cells are left out of the
estimate and named). Bytes: the store's shard files (content bytes + 20 per patch) and each training cell's
checkpoints (a full checkpoint every ``ckpt_every_min`` of estimated run time, ``CKPT_BYTES`` each: never at an
epoch's end; best.pt rewritten ``BEST_WRITES`` times and final.pt where the cell keeps it, ``WEIGHTS_BYTES``
each). Files: a
dataset's fixed metadata files plus one per shard file; a cell's run directory and its submitit files.
"""

import math
from dataclasses import dataclass, field

from histokt.study import plan
from histokt.study.spec import Spec
from histokt.train.config import TrainConfig

IMG_PER_S = 5000.0  # ResNet18 at 272 px, bf16, 8 loader workers, one H100 (README "Benchmarks")
WEIGHTS_BYTES = 45 * 2**20  # a ResNet18 state_dict (11.2M parameters, fp32)
CKPT_BYTES = 135 * 2**20  # weights + optimizer state (AdamP: two moments) + RNG and loop state
BEST_WRITES = 20  # best.pt rewrites per cell: strictly improving epochs, a guess stated in the output
DATASET_FILES = 60  # a dataset's groups and small arrays (measured: tests/ingest/test_standardize.py)
CELL_FILES = 12  # config, metrics, state, result, best, final, lease; submitit's script, logs, pickles
SHARD_SIZE = 512
PATCH = 272
# stored content of datasets whose sources are smaller than the patch (README "Store schema")
CONTENT_PX = {"pcam": (93, 93), "crc": (112, 112), "ajlymph": (260, 272), "mhist": (PATCH, PATCH)}
SPLIT = {"train": 0.8, "valid": 0.1, "test": 0.1}  # an estimate's cut


@dataclass
class StageCost:
    cells: int = 0
    arrays: int = 0
    waves: int = 0
    requested_gpu_h: float = 0.0
    estimated_gpu_h: float = 0.0
    bytes_written: float = 0.0
    files: int = 0
    unknown: set = field(default_factory=set)  # datasets without a patch count


def dataset_counts(spec: Spec) -> dict[str, dict[str, int] | None]:
    """{dataset: {split: patches}} from the store where standardized, else the spec's estimate, else None."""
    from histokt.store.schema import dataset_attrs

    out: dict[str, dict[str, int] | None] = {}
    for name, d in spec.datasets.items():
        attrs = dataset_attrs(spec.store, name)
        if attrs and isinstance(attrs.get("counts"), dict):
            out[name] = {k: int(v) for k, v in attrs["counts"].items()}
        elif d.patches:
            out[name] = {k: round(d.patches * f) for k, f in SPLIT.items()}
        else:
            out[name] = None
    return out


def study_cost(
    spec: Spec, cells: dict, work: dict, arrays: dict[str, int], max_queued: int, img_per_s: float = IMG_PER_S
) -> dict[str, StageCost]:
    """The cost of the cells in ``work`` (stage -> cell indices), stage by stage."""
    counts = dataset_counts(spec)
    ckpt_min = float(TrainConfig.__dataclass_fields__["ckpt_every_min"].default)  # type: ignore[arg-type]
    out = {}
    for stage, indices in work.items():
        c = StageCost(cells=len(indices), arrays=arrays.get(stage, 0), waves=math.ceil(len(indices) / max_queued))
        r = spec.stages[stage].resources if stage in spec.stages else None
        for i in indices:
            cell = cells[stage][i]
            name = plan.cell_dataset(cell)
            res = r.for_dataset(name) if r else None
            if res is not None:
                c.requested_gpu_h += max(res.gpus, 0) * res.nodes * res.time_min / 60  # G GPUs on each node
            c.files += CELL_FILES
            n = counts.get(name) if name else None
            if cell.kind == "standardize" and n is not None:
                shards = spec.datasets[name].shards
                h, w = CONTENT_PX.get(spec.datasets[name].card, (PATCH, PATCH))
                c.bytes_written += sum(n.values()) * (h * w * 3 + 20) / shards
                c.files += round((DATASET_FILES + sum(math.ceil(v / SHARD_SIZE) for v in n.values())) / shards)
            elif cell.kind == "train":
                if n is None:
                    c.unknown.add(name)
                    continue
                epochs = int(cell.args.get("epochs", TrainConfig.__dataclass_fields__["epochs"].default))
                images = epochs * (n.get("train", 0) + n.get("valid", 0)) + n.get("test", 0)
                hours = images / img_per_s / 3600
                c.estimated_gpu_h += hours * max(1, res.gpus * res.nodes if res else 1)
                saves = math.floor(hours * 60 / ckpt_min) if ckpt_min else 0  # by wall time only
                final = "final" in str(cell.args.get("keep", "best,final"))
                c.bytes_written += saves * CKPT_BYTES + (BEST_WRITES + final) * WEIGHTS_BYTES
        out[stage] = c
    return out


def render(costs: dict[str, StageCost], max_queued: int, img_per_s: float) -> str:
    """The cost table ``histokt sweep --dry-run`` prints."""
    lines = [
        f"{'stage':<12} {'cells':>6} {'arrays':>6} {'waves':>5} {'GPU-h asked':>12} {'GPU-h est.':>11} "
        f"{'written':>10} {'files':>8}"
    ]
    total = StageCost()
    for stage, c in costs.items():
        lines.append(
            f"{stage:<12} {c.cells:>6} {c.arrays:>6} {c.waves:>5} {c.requested_gpu_h:>12,.0f} "
            f"{c.estimated_gpu_h:>11,.1f} {_size(c.bytes_written):>10} {c.files:>8,}"
        )
        for attr in ("cells", "arrays", "requested_gpu_h", "estimated_gpu_h", "bytes_written", "files"):
            setattr(total, attr, getattr(total, attr) + getattr(c, attr))
        total.unknown |= c.unknown
    lines.append(
        f"{'total':<12} {total.cells:>6} {total.arrays:>6} {'':>5} {total.requested_gpu_h:>12,.0f} "
        f"{total.estimated_gpu_h:>11,.1f} {_size(total.bytes_written):>10} {total.files:>8,}"
    )
    lines.append(
        f"waves: under a queue budget of {max_queued} tasks; estimate at {img_per_s:,.0f} images/s per GPU "
        f"(--throughput), best.pt rewritten {BEST_WRITES} times a cell (a guess)"
    )
    if total.unknown:
        lines.append(f"not estimated (no store counts and no [datasets.X] patches): {', '.join(sorted(total.unknown))}")
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
