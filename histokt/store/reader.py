"""The torch Dataset over one store split, and the DataLoader that feeds a GPU from it.

The dataset opens nothing at construction beyond the dataset's metadata file, so it pickles into
spawn/forkserver DataLoader workers; each worker opens the split on first use. ``__getitems__`` builds
a whole batch in one call (torch >= 2.1 uses it when batching): patches are read, augmented and
normalized straight into one float32 buffer, allocated in shared memory inside a worker, so the batch
crosses to the main process without another copy. Batches come out NCHW in channels_last memory layout,
the layout convolutions run fastest in on a GPU.

With ``recycle=True`` (the training loop's loader) a worker writes each batch into the oldest of a ring of
RING shared-memory buffers instead of a fresh one: a fresh buffer costs a page fault per 4 KiB in the worker
(~170 µs a 272 px patch) and a new mapping in the main process. Safe because the DataLoader gives a worker
at most PREFETCH batches in flight and hands it a new one only once the main process has taken an older
one: when a buffer comes round again (RING = PREFETCH + 2 batches later), the batch it held was consumed
(copied to pinned memory on a GPU) and the step that used it is over. A consumer that keeps batches (a
list of them) must not ask for recycling, nor one that keeps a batch of an iteration it abandons when it
iterates again (the DataLoader then drains the old tasks into the ring before the new ones).
"""

import multiprocessing
from collections import deque
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from histokt.errors import UserError
from histokt.store.schema import SPLITS, PatchReader, open_attrs

PREFETCH = 4  # batches in flight per worker
RING = PREFETCH + 2  # recycled batch buffers per worker


class PatchDataset(Dataset):
    """(image, label) samples of ``STORE/<dataset>/<split>``.

    augment: callable (patch uint8 HWC, index) -> uint8 HWC (e.g. ``augment.Augment``), or None.
    normalize: ``augment.Normalize`` for float32 output, or None for uint8 output.
    """

    def __init__(
        self, store, dataset: str, split: str, augment=None, normalize=None, augment_on_device=False, recycle=False
    ):
        if split not in SPLITS:
            raise UserError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
        self.attrs = open_attrs(store, dataset)
        self.classes = list(self.attrs["classes"])
        self.multi_label = bool(self.attrs["multi_label"])
        self.patch_size = int(self.attrs["patch_size"])
        self.n = int(self.attrs["counts"][split])
        self.reader = PatchReader(store, dataset, split)
        self.augment = augment
        self.normalize = normalize
        # the warp runs on the GPU (augment.warp_batch): batches carry raw patches and the per-sample draws
        self.augment_on_device = bool(augment and augment_on_device)
        self.recycle = bool(recycle)
        self._rings: dict[tuple, deque] = {}  # (shape, dtype) -> the worker's batch buffers, oldest first
        self._labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.n

    def __getstate__(self):
        return {**self.__dict__, "_labels": None, "_rings": {}}

    @property
    def labels(self) -> torch.Tensor:
        if self._labels is None:
            labels = self.reader.read_meta("labels")
            self._labels = torch.from_numpy(labels.astype(np.float32) if self.multi_label else labels)
        return self._labels

    def _patch(self, key) -> np.ndarray:
        epoch, index = key
        patch = self.reader.read(index)
        return self.augment(patch, index, epoch) if self.augment and not self.augment_on_device else patch

    def __getitem__(self, index):
        images, labels = self.__getitems__([index])
        return images[0], labels[0]

    def __getitems__(self, keys):
        """A whole batch: (images [B, 3, H, W] channels_last, labels [B] or [B, C]), plus the augmentation
        draws [B, 5] when the warp runs on the device.

        A key is a sample index, or (epoch, index) so augmentation follows the sampler's epoch.
        """
        keys = epoch_keys(keys)
        indices = [k[1] for k in keys]
        first = self._patch(keys[0])
        h, w = first.shape[:2]
        dtype = torch.float32 if self.normalize else torch.uint8
        images = self._buffer((len(indices), h, w, 3), dtype)
        buf = images.numpy()
        for k, key in enumerate(keys):
            patch = first if k == 0 else self._patch(key)
            if self.normalize:
                self.normalize.into(patch, buf[k])
            else:
                buf[k] = patch
        if self.augment_on_device:
            return images.permute(0, 3, 1, 2), self.labels[indices], self.augment.batch_params(keys, h, w)
        return images.permute(0, 3, 1, 2), self.labels[indices]

    def _buffer(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """The batch's buffer: the ring's oldest (inside a worker, where recycling is asked), else a new one."""
        if not self.recycle or get_worker_info() is None:
            return _empty(shape, dtype)
        ring = self._rings.setdefault((shape, dtype), deque())
        buf = ring.popleft() if len(ring) == RING else _empty(shape, dtype)
        ring.append(buf)
        return buf


def epoch_keys(keys) -> list[tuple[int | None, int]]:
    """Batch keys as (epoch, index) pairs: a bare index has no epoch (the augmentation's own)."""
    return [(None, int(k)) if isinstance(k, (int, np.integer)) else (int(k[0]), int(k[1])) for k in keys]


def _empty(shape, dtype) -> torch.Tensor:
    """A tensor in shared memory inside a DataLoader worker (so sending it costs no copy), else plain."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(numel * torch.empty((), dtype=dtype).element_size())
    return torch.tensor([], dtype=dtype).set_(storage).view(shape)


def _batched(batch):
    """collate_fn for batches that ``__getitems__`` already assembled."""
    return batch


def make_loader(
    dataset: PatchDataset,
    batch_size: int | None = None,
    sampler=None,
    batch_sampler=None,
    shuffle: bool = False,
    workers: int = 0,
    pin_memory: bool = False,
    generator=None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over ``dataset`` with batched reads; workers start by forkserver (zarr must not fork)."""
    kw: dict[str, Any] = {}
    if workers:
        kw = {
            "multiprocessing_context": multiprocessing.get_context("forkserver"),
            "persistent_workers": True,
            "prefetch_factor": PREFETCH,
        }
    return DataLoader(
        dataset,
        batch_size=1 if batch_sampler is not None else batch_size,  # 1: DataLoader's 'unset'
        sampler=sampler,
        batch_sampler=batch_sampler,
        shuffle=shuffle if sampler is None and batch_sampler is None else False,
        num_workers=workers,
        collate_fn=_batched,
        pin_memory=pin_memory,
        generator=generator,
        drop_last=drop_last and batch_sampler is None,
        **kw,
    )
