"""Node-local staging: a dataset's files copied once per node to local disk, and read from there.

``with staged(store, dataset, dest) as root:`` yields a store root to read the dataset from (the same
patches, bytes for bytes, as ``store``): a copy of the whole dataset on ``dest`` (``histokt train
--stage-to DIR``, by default ``$SLURM_TMPDIR``), made by one process and shared by every process of the
node that stages the same dataset at the same time (DDP ranks, cells packed on one node); the last one to
leave removes it. Layout under ``DEST/histokt-stage/``, for KEY = ``<dataset>-<fingerprint>-<store tag>``::

    KEY/                        the published copy: a store of its own (root zarr.json, <dataset>/ copied
                                whole, histokt-stage.json: what was copied, file by file, from where)
    KEY.lease                   held (histokt.lease) by whoever copies, checks or removes the copy
    KEY.users/<host>-<pid>-<n>  one lease per process using it, with a heartbeat
    .KEY.copy-<host>-<pid>/     a copy being made: invisible until one rename publishes it whole
    .KEY.gone-<host>-<pid>/     a copy being removed: renamed away first, so nobody sees it half-deleted

The rules, and why they are safe:

- A user registers (its file in ``KEY.users/``) before it looks at the copy, and it looks only while it
  holds ``KEY.lease``; a user leaving removes its file, then, holding the lease, removes the copy only
  where no live user is registered. Looking and removing are serialized by the lease, so a copy is never
  removed under a user, and a user never picks a copy that is being removed.
- A user that finds no copy copies, holding the lease: into a temporary sibling, file by file (fsynced),
  then one ``os.rename`` publishes it. The others wait for the lease (it beats while the copy runs); a
  copier that died (a dead pid of this host, or no heartbeat from another host for ``stale_after`` s) has
  its lease taken over, and its temporary folder is removed by the next copier.
- Live or dead users are told apart by histokt.lease's rules: a user of this host whose pid is dead is
  not live, nor is one of another host whose heartbeat stopped; their files are removed.
- The key holds the dataset's fingerprint: a dataset standardized again gets a new copy. The fingerprint
  is read again after copying and from the copy itself; a dataset replaced while it was copied is not
  published under the old key (the copy is dropped and made again under the new one).
- A copy found damaged (a file missing or of another size than its manifest says: a tmp cleaner was
  there) is removed and made again.
- Copies that no live process uses (their users were killed: SIGKILL, a node crash) are removed by the
  next process that leaves them, or that copies anything into the same folder (garbage of other keys,
  e.g. a dataset since standardized again, is collected before copying).
- The store tag (a hash of the source store's resolved path) keeps the copies of two stores apart,
  so ``link_dataset`` can expose another dataset of the source store beside the copy without ambiguity.

Messages: one stderr line, "histokt: staged <dataset> to <path>: N MB in S s (R MB/s)" from the copier,
"histokt: using the staged copy at <path>" from the others (``verbose``). A folder that cannot be written
is one UserError line; so is a full disk (``histokt.errors.on_full_disk``), checked before copying too.
"""

import contextlib
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from histokt import lease as leases
from histokt.atomic import fsync_dir
from histokt.errors import UserError, full_disk, on_full_disk
from histokt.lease import DEFAULT_STALE_S, Lease
from histokt.store.schema import dataset_attrs, list_datasets, open_attrs

STAGE_DIR = "histokt-stage"  # under DEST
MANIFEST = "histokt-stage.json"  # in a published copy
POLL_S = 0.2  # how often a waiting user looks at the lease again
RETRIES = 3  # copies dropped because the dataset changed meanwhile, before giving up

# Called with each file's destination right after it is copied; None in production. Tests set it to make
# a copy slow or blocked at a known point (a process killed mid-copy), benchmarks leave it alone.
on_file_copied: Callable[[Path], None] | None = None

_users = itertools.count()


class DatasetChanged(Exception):
    """The source dataset changed (another fingerprint) while it was being copied."""


def stage_key(store, dataset: str) -> str:
    """The key of the staged copy of ``STORE/<dataset>`` as it is now: ``<dataset>-<fingerprint>-<store tag>``;
    a clear UserError where the store or the dataset is missing or unreadable by this version."""
    return f"{dataset}-{_fingerprint(store, dataset)}-{_store_tag(store)}"


def _store_tag(store) -> str:
    return hashlib.sha256(str(Path(store).resolve()).encode()).hexdigest()[:8]


def _fingerprint(store, dataset: str) -> str:
    attrs = open_attrs(store, dataset)
    fingerprint = attrs.get("fingerprint")
    if not isinstance(fingerprint, str) or not re.fullmatch(r"[0-9a-f]{8,64}", fingerprint):
        raise UserError(f"{store}/{dataset}: no valid fingerprint ({fingerprint!r}); standardize it again")
    return fingerprint


@contextlib.contextmanager
def staged(store, dataset: str, dest, *, stale_after: float = DEFAULT_STALE_S, verbose: bool = True) -> Iterator[Path]:
    """Yield the root of a node-local store holding ``dataset`` of ``store``, copied into ``dest`` by this
    process or found there (rules: the module docstring); on exit, removed if no live user remains. The
    copier always says what it copied (one stderr line); ``verbose``: the others say which copy they use."""
    base = Path(dest) / STAGE_DIR
    for attempt in range(RETRIES + 1):
        fingerprint = _fingerprint(store, dataset)
        key = f"{dataset}-{fingerprint}-{_store_tag(store)}"
        me = _register(base, key, Path(dest), stale_after)
        try:
            root, made = _obtain(base, key, fingerprint, Path(store), dataset, stale_after)
        except DatasetChanged:
            _leave(base, key, me, stale_after)
            if attempt == RETRIES:
                raise UserError(
                    f"{store}/{dataset}: changed while it was being staged, {RETRIES + 1} times; "
                    f"stage it again once nothing rewrites it"
                ) from None
            continue
        except BaseException:
            _leave(base, key, me, stale_after)
            raise
        break
    if verbose and made is None:
        print(f"histokt: using the staged copy at {root}", file=sys.stderr, flush=True)
    elif made is not None:
        mb, seconds = made
        print(
            f"histokt: staged {dataset} to {root}: {mb:.0f} MB in {seconds:.1f} s ({mb / max(seconds, 1e-6):.0f} MB/s)",
            file=sys.stderr,
            flush=True,
        )
    try:
        with me.beating():
            yield root
    finally:
        _leave(base, key, me, stale_after)


def link_dataset(root, store, name: str) -> None:
    """Make ``STORE/<name>`` readable in the staged store ``root`` too, in place (a symbolic link, nothing
    copied): e.g. the source dataset whose normalization statistics a transfer cell reads."""
    root, store = Path(root), Path(store)
    if dataset_attrs(store, name) is None:
        have = ", ".join(list_datasets(store)) or "none"
        raise UserError(f"{store}: no dataset {name!r} (datasets in this store: {have})")
    link = root / name
    if link.is_symlink() or link.exists():
        return  # one store per key: whoever linked it first linked the same folder
    tmp = root / f".{name}.link-{socket.gethostname()}-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink((store / name).resolve(), tmp, target_is_directory=True)
    os.replace(tmp, link)


# -- users -----------------------------------------------------------------------------------------------------


def _register(base: Path, key: str, dest: Path, stale_after: float) -> Lease:
    """This process's user file in ``KEY.users/`` (a lease: host, pid, heartbeat)."""
    users = base / f"{key}.users"
    name = f"{socket.gethostname()}-{os.getpid()}-{next(_users)}"
    for _ in range(100):  # the folder is removed by a last user leaving at this very moment: make it again
        try:
            users.mkdir(parents=True, exist_ok=True)
            me = Lease.acquire(users / name, stale_after=stale_after)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise full_disk(exc, dest) or UserError(
                f"{dest}: cannot stage datasets there ({exc.strerror}); choose a writable folder on the node's "
                f"local disk (--stage-to DIR, or stage_to in the spec), or turn staging off (--stage-to off)"
            ) from None
        if me is None:
            raise RuntimeError(f"{users / name}: held by another live process")
        return me
    raise RuntimeError(f"{users}: removed again and again while registering")


def _live_users(base: Path, key: str, stale_after: float) -> int:
    """Users of ``key`` whose process lives; the files of dead ones are removed."""
    users = base / f"{key}.users"
    try:
        entries = list(users.iterdir())
    except FileNotFoundError:
        return 0
    live = 0
    for path in entries:
        if leases.is_stale(path, stale_after):
            path.unlink(missing_ok=True)
        else:
            live += 1
    return live


def _leave(base: Path, key: str, me: Lease, stale_after: float) -> None:
    """Unregister; then remove the copy if no live user is left. A copy that is absent needs nothing
    (removed already, or a new user is making one for itself)."""
    me.release()
    if not (base / key).exists():
        with contextlib.suppress(OSError):
            (base / f"{key}.users").rmdir()  # fails where a user is registered (a new one retries if it vanishes)
    while (base / key).exists() and not _remove_unused(base, key, stale_after):
        time.sleep(POLL_S)  # an entering user checking it, or another leaving one: brief


def _remove_unused(base: Path, key: str, stale_after: float) -> bool:
    """Holding the lease of ``key``, remove its copy, its users' folder and leftovers where no live user is
    registered; False (nothing done) where another process holds the lease."""
    lease = Lease.acquire(base / f"{key}.lease", stale_after=stale_after)
    if lease is None:
        return False
    try:
        if _live_users(base, key, stale_after):
            return True
        gone = _rename_away(base, key)
        _sweep_leftovers(base, key)
        with contextlib.suppress(OSError):
            (base / f"{key}.users").rmdir()  # not empty: a user registered meanwhile, and will leave it
    finally:
        lease.release()
    if gone is not None:
        shutil.rmtree(gone, ignore_errors=True)
    return True


def _collect_garbage(base: Path, mine: str, stale_after: float) -> None:
    """Remove the copies (and leftovers) of other keys that no live process uses: those of processes that
    were killed (SIGKILL, a node crash), e.g. of a dataset since standardized again. Leases held by
    others are skipped, never waited for."""
    keys = set()
    for path in base.iterdir():
        name = path.name
        if name.startswith("."):
            continue
        for suffix in (".users", ".lease"):
            if name.endswith(suffix):
                keys.add(name[: -len(suffix)])
                break
        else:
            if path.is_dir():
                keys.add(name)
    for key in sorted(keys - {mine}):
        _remove_unused(base, key, stale_after)


def _rename_away(base: Path, key: str) -> Path | None:
    gone = base / f".{key}.gone-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(gone, ignore_errors=True)
    try:
        os.rename(base / key, gone)
    except FileNotFoundError:
        return None
    return gone


# -- the copy --------------------------------------------------------------------------------------------------


def _obtain(
    base: Path, key: str, fingerprint: str, store: Path, dataset: str, stale_after: float
) -> tuple[Path, tuple[float, float] | None]:
    """The published copy of ``key``, made here (then also (MB, seconds)) or found intact."""
    published = base / key
    while True:
        lease = Lease.acquire(base / f"{key}.lease", stale_after=stale_after)
        if lease is None:  # a live process copies (or checks) it: wait for it
            time.sleep(POLL_S)
            continue
        try:
            if published.is_dir():
                if _intact(published):
                    return published, None
                gone = _rename_away(base, key)
                if gone is not None:
                    shutil.rmtree(gone, ignore_errors=True)
            _sweep_leftovers(base, key)
            _collect_garbage(base, key, stale_after)  # room for this copy
            with lease.beating():
                made = _copy(base, key, fingerprint, store, dataset, lease)
            return published, made
        finally:
            lease.release()


def _intact(published: Path) -> bool:
    """Every file the manifest lists is there with its size (metadata files may have gained cached attrs)."""
    try:
        files = json.loads((published / MANIFEST).read_text())["files"]
        for rel, size in files.items():
            st = (published / rel).stat()
            if st.st_size != size and not rel.endswith("zarr.json"):
                return False
    except (OSError, ValueError, KeyError, AttributeError):
        return False
    return True


def _sweep_leftovers(base: Path, key: str) -> None:
    """Remove the temporary folders of copiers that did not finish (we hold the lease: none is still
    legitimately writing) and of removals that died; a live process's removal of this host is left to it."""
    host = socket.gethostname()
    for path in base.iterdir():
        if not path.name.startswith(f".{key}."):
            continue
        kind, _, owner = path.name[len(key) + 2 :].partition("-")
        if kind == "gone":
            h, _, pid = owner.rpartition("-")
            if h == host and pid.isdigit() and leases.alive(int(pid)) and int(pid) != os.getpid():
                continue
        elif kind != "copy":
            continue
        shutil.rmtree(path, ignore_errors=True)


def _source_files(src: Path) -> list[tuple[str, int]]:
    """(path relative to ``src``, size) of every file under it, in a fixed order."""
    out = []
    for folder, dirs, files in os.walk(src):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            out.append((path.relative_to(src).as_posix(), path.stat().st_size))
    return out


def _copy(base: Path, key: str, fingerprint: str, store: Path, dataset: str, lease: Lease) -> tuple[float, float]:
    """Copy ``STORE/<dataset>`` (and the root group's zarr.json) into a temporary sibling, check that the
    dataset did not change meanwhile, and publish it with one rename. Returns (MB, seconds)."""
    tmp = base / f".{key}.copy-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        files = _source_files(store / dataset)
        need = sum(size for _, size in files)
        free = shutil.disk_usage(base).free
        if need > free:
            raise UserError(
                f"{base}: not enough space to stage {dataset} ({need / 1e6:.2f} MB needed, {free / 1e6:.2f} MB "
                f"free); free space, choose another --stage-to DIR, or turn staging off (--stage-to off)"
            )
        with on_full_disk(tmp):
            tmp.mkdir()
            _copy_file(store / "zarr.json", tmp / "zarr.json")
            manifest = {"zarr.json": (tmp / "zarr.json").stat().st_size}
            folders = {tmp, tmp / dataset}
            (tmp / dataset).mkdir()
            for rel, _ in files:
                target = tmp / dataset / rel
                if target.parent not in folders:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    folders.add(target.parent)
                manifest[f"{dataset}/{rel}"] = _copy_file(store / dataset / rel, target)
                if on_file_copied is not None:
                    on_file_copied(target)
            copied = json.loads((tmp / dataset / "zarr.json").read_text()).get("attributes", {}).get("fingerprint")
            if _fingerprint(store, dataset) != fingerprint or copied != fingerprint:
                raise DatasetChanged(dataset)
            total = sum(manifest.values())
            info = {
                "store": str(store.resolve()),
                "dataset": dataset,
                "fingerprint": fingerprint,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "bytes": total,
                "files": manifest,
            }
            with open(tmp / MANIFEST, "w") as f:
                json.dump(info, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(folder)
        if not lease.held():  # taken over while this process stalled: the new holder copies
            raise RuntimeError(f"{lease.path}: lost while copying {dataset}; stage it again")
        os.rename(tmp, base / key)
        fsync_dir(base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return total / 1e6, time.perf_counter() - t0


def _copy_file(src: Path, dst: Path) -> int:
    """Copy one file (in-kernel where the system allows), fsynced; returns its size."""
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        size = os.fstat(fi.fileno()).st_size
        done = 0
        try:
            while done < size:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), size - done)
                if n == 0:
                    break
                done += n
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                raise
            fi.seek(done)
            fo.seek(done)
            shutil.copyfileobj(fi, fo, 1 << 23)
        fo.flush()
        os.fsync(fo.fileno())
        return os.fstat(fo.fileno()).st_size
