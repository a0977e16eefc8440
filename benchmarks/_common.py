"""Shared helpers of the benchmark scripts: synthetic tissue images, machine info, tables, results files.

Benchmarks are measured, never asserted: each script prints a markdown table and writes the same numbers,
with the machine they came from, to ``benchmarks/results/<name>.json``.
"""

import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "histokt-bench"
N_CLASSES = 3

# H&E-like colours: eosin-pink stroma, hematoxylin-purple nuclei.
_PINK = np.array([232, 150, 200], dtype=np.float32)
_PURPLE = np.array([110, 60, 160], dtype=np.float32)


def tissue(seed: int, size: int) -> np.ndarray:
    """A (size, size, 3) uint8 tissue-like image: smooth pink/purple stain fields plus fine grain.

    The mix of a coarse and a fine smoothed-noise field gives blobs at two scales, and the grain keeps
    every patch well above the low-contrast threshold (contrast ~0.2 against the 0.05 limit), while
    the PNG compresses like real H&E (~1.9 MB at 1024 px, zlib level 6).
    """
    rng = np.random.default_rng(seed)

    def field(cells: int) -> np.ndarray:
        low = rng.integers(0, 256, size=(cells, cells), dtype=np.uint8)
        return np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0

    t = 0.6 * field(max(2, size // 64)) + 0.4 * field(max(2, size // 8))
    t = np.clip((t - 0.5) * 2.0 + 0.5, 0.0, 1.0)
    img = _PINK + (_PURPLE - _PINK) * t[..., None]
    img += rng.normal(0.0, 6.0, size=(size, size, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_png(job) -> None:
    path, seed, size = job
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(tissue(seed, size)).save(tmp, format="PNG")  # Pillow's default zlib level 6
    os.replace(tmp, path)  # an interrupted generation never leaves a truncated PNG in the cache


def image_pool(work: Path, n: int, size: int, procs: int = 2) -> list[Path]:
    """The first ``n`` cached images of side ``size`` (generated where missing), class = index % 3."""
    pool = Path(work) / f"images-{size}"
    paths = [pool / f"class_{i % N_CLASSES}" / f"img_{i:05d}.png" for i in range(n)]
    for c in range(N_CLASSES):
        (pool / f"class_{c}").mkdir(parents=True, exist_ok=True)
    todo = [(p, i, size) for i, p in enumerate(paths) if not p.is_file()]
    if todo:
        print(
            f"generating {len(todo)} tissue images of {size}x{size} px in {pool} (cached for later runs)...",
            file=sys.stderr,
            flush=True,
        )
        if procs > 1 and len(todo) > 1:
            with ProcessPoolExecutor(procs, mp_context=get_context("spawn")) as ex:
                list(ex.map(_write_png, todo, chunksize=4))
        else:
            for job in todo:
                _write_png(job)
    return paths


def folder_dataset(work: Path, n: int, size: int, procs: int = 2) -> Path:
    """A folder-card raw dir (class_0..class_2) of ``n`` images, hard links into the shared image pool."""
    paths = image_pool(work, n, size, procs)
    raw = Path(work) / f"raw-{size}-{n}"
    for p in paths:
        dst = raw / p.parent.name / p.name
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, dst)
            except OSError:  # another file system: a copy is as good
                dst.write_bytes(p.read_bytes())
    return raw


def warm_page_cache(paths) -> int:
    """Read every file once so timings measure CPU work, not the disk; returns the bytes read."""
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
    return total


def vm_hwm_mb(pid="self") -> float | None:
    """Peak resident memory (MiB) of one live process: the kernel's VmHWM, reset at exec.

    Not ``getrusage().ru_maxrss``: Linux carries ru_maxrss over exec from the forking parent, so a child
    started by a big process reports the parent's size (measured here: 653 MiB for a child whose own
    peak was 11 MiB, because the parent had imported torch).
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_seconds(pid) -> float | None:
    """User + system CPU seconds of one live process so far (from /proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def children(pid: int | None = None) -> list[int]:
    """Pids of the live child processes of ``pid`` (default: this process)."""
    return _children(os.getpid() if pid is None else pid)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                    out.append(int(entry))
            except (OSError, ValueError):
                pass
    return out


class PeakRSS:
    """Context manager: peak RSS of this process and of each child process (sampled every ``interval`` s).

    A child's VmHWM is a high-water mark, so the last sample before it exits is its peak up to that moment.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.children = {}
        self._stop = threading.Event()

    def _sample(self):
        for pid in _children(os.getpid()):
            hwm = vm_hwm_mb(pid)
            if hwm is not None:
                self.children[pid] = max(hwm, self.children.get(pid, 0.0))

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        """{"self": MiB, "children": largest child MiB or None, "per_child": [MiB...]}"""
        per = sorted((round(v, 1) for v in self.children.values()), reverse=True)
        return {"self": round(vm_hwm_mb() or 0.0, 1), "children": per[0] if per else None, "per_child": per}


def machine_info() -> dict:
    import PIL
    import torch
    import zarr

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    with contextlib.suppress(OSError, IndexError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_model": model,
        "memory": mem,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "pillow": PIL.__version__,
    }


def markdown_table(headers, rows) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):  # first column (labels) left-aligned, numbers right-aligned
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"

    sep = "|" + "|".join(":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _fmt(v) -> str:
    if isinstance(v, float):
        if v >= 100:
            return f"{v:,.0f}"
        if v >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def write_results(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def footprint(*folders) -> dict:
    """Files, folders (each folder itself included) and bytes under ``folders`` (absent ones count 0):
    ``inodes`` = files + folders, ``size`` = sum of st_size, ``allocated`` = sum of st_blocks * 512."""
    files = dirs = size = allocated = 0
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        dirs += 1
        for root, dnames, fnames in os.walk(folder):
            dirs += len(dnames)
            for name in fnames:
                st = os.lstat(os.path.join(root, name))
                files, size, allocated = files + 1, size + st.st_size, allocated + st.st_blocks * 512
    return {"files": files, "dirs": dirs, "inodes": files + dirs, "size": size, "allocated": allocated}


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages (as ``uptime`` prints them), rounded."""
    return [round(x, 2) for x in os.getloadavg()]
