"""A split held in device memory, and the batches made there.

The stored content (uint8, without the padding the store never holds) is read once, each patch's checksum
verified, into one tensor on the device. A batch is then a gather by index, a mirror pad to the patch size
and the loader path's per-sample augmentation draws (``Augment.params``), all without a worker process or
a host copy; the affine warp, flips and normalization follow on the device (histokt.train.loop). For the
same keys the batch holds the same pixels, labels and draws as ``PatchDataset.__getitems__`` with the warp
on the device, so a cell may switch between the two paths between attempts without changing a bit.

"Device" is whatever torch device is given: the CPU too, which is how the path is tested without a GPU.
"""

import numpy as np
import torch
from tqdm import tqdm

from histokt.store.reader import PatchDataset, epoch_keys
from histokt.store.schema import PatchReader, open_attrs

_READ_CHUNK = 256  # patches copied to the device at once (57 MB of host memory at 272 px)


def split_nbytes(store, dataset: str, split: str) -> int:
    """Device bytes a resident split takes (content and labels), from the dataset's attrs alone."""
    attrs = open_attrs(store, dataset)
    n = int(attrs["counts"][split])
    h, w = attrs.get("content_size") or (attrs["patch_size"], attrs["patch_size"])
    label_bytes = 4 * len(attrs["classes"]) if attrs["multi_label"] else 8  # float32 [C] or one int64
    return n * (int(h) * int(w) * 3 + label_bytes)


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the GPU's free memory, or for the CPU the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def reflect_index(n: int, size: int) -> np.ndarray:
    """Source position of each of ``size`` positions when ``n`` positions are mirror-padded at the end
    without repeating the edge (numpy's ``reflect``, as ``shards.pad_on_read``): period 2(n - 1)."""
    k = np.arange(size)
    if n == 1:
        return np.zeros(size, dtype=np.int64)
    period = 2 * (n - 1)
    k = k % period
    return np.where(k < n, k, period - k).astype(np.int64)


class ResidentSplit:
    """Patches ``rows`` (default: all) of ``STORE/<dataset>/<split>`` on ``device``; keys as PatchDataset's."""

    def __init__(
        self, store, dataset: str, split: str, device: torch.device, *, augment=None, rows=None, progress=False
    ):
        self.dataset = PatchDataset(store, dataset, split, augment=augment, augment_on_device=True)
        reader = self.dataset.reader
        self.rows = range(len(reader)) if rows is None else rows
        self.device = device
        h, w = reader.content_shape
        self.patch_size = reader.patch_size
        self.content = torch.empty((len(self.rows), h, w, 3), dtype=torch.uint8, device=device)
        self._load(reader, progress, f"{dataset}/{split} to {device}")
        reader.close()
        self.labels = self.dataset.labels[self.rows.start : self.rows.stop].to(device)
        pad = (h, w) != (self.patch_size, self.patch_size)
        at = [torch.from_numpy(reflect_index(n, self.patch_size)).to(device) for n in (h, w)]
        self._pad_at: list[torch.Tensor] | None = at if pad else None

    def _load(self, reader: PatchReader, progress: bool, desc: str) -> None:
        """Chunks of patches through one host buffer: flat host memory whatever the split. Not pinned: a
        one-time copy, and pinned blocks stay in torch's host cache for the life of the process."""
        n, chunk = len(self.rows), min(_READ_CHUNK, max(1, len(self.rows)))
        host = torch.empty((chunk, *self.content.shape[1:]), dtype=torch.uint8)
        buf = host.numpy()
        with tqdm(total=n, desc=desc, unit="patch", leave=False, disable=None if progress else True) as bar:
            for a in range(0, n, chunk):
                b = min(n, a + chunk)
                for k in range(a, b):
                    buf[k - a] = reader.read_content(self.rows[k])
                self.content[a:b].copy_(host[: b - a])
                bar.update(b - a)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return self.content.numel() + self.labels.numel() * self.labels.element_size()

    def _pixels(self, local: torch.Tensor | slice) -> torch.Tensor:
        """[B, 3, P, P] uint8 (an NHWC tensor seen as NCHW, as the loader's batches) of local rows."""
        x = self.content[local] if isinstance(local, slice) else self.content.index_select(0, local)
        if self._pad_at is not None:
            x = x.index_select(1, self._pad_at[0]).index_select(2, self._pad_at[1])
        return x.permute(0, 3, 1, 2)

    def batch(self, keys) -> tuple[torch.Tensor, ...]:
        """(images, labels[, draws]) of ``keys``, sample indices or (epoch, index), as PatchDataset's batch."""
        pairs = epoch_keys(keys)
        at = self._sent(torch.tensor([i - self.rows.start for _, i in pairs], dtype=torch.int64))
        images, labels = self._pixels(at), self.labels.index_select(0, at)
        augment = self.dataset.augment
        if augment is None:
            return images, labels
        return images, labels, self._sent(augment.batch_params(pairs, self.patch_size, self.patch_size))

    def _sent(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` on the device without waiting: a copy from pageable memory would wait for the GPU's queue
        to drain (CUDA syncs the stream first); from pinned memory it is queued behind the running step."""
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def rows_batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of sample indices start … stop-1, held here (evaluation's contiguous shards)."""
        local = slice(start - self.rows.start, stop - self.rows.start)
        return self._pixels(local), self.labels[local]


class ResidentLoader:
    """Iterates a batch sampler's keys as batches of a ResidentSplit (the DataLoader's place on this path)."""

    def __init__(self, split: ResidentSplit, batch_sampler):
        self.split, self.batch_sampler = split, batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        for keys in self.batch_sampler:
            yield self.split.batch(keys)
