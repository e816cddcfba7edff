"""Training and evaluation batches from the image store, transformed on the model's device.

Per batch, the host only gathers the uint8 rows of the memory-mapped store (``np.take`` into one
buffer, pinned when the device is CUDA) and launches a non-blocking copy; normalisation, flip,
pad-crop and random erasing run on the device as a few batched tensor ops
(:func:`~tune_clipfh.data.store.gather_images`, :func:`~tune_clipfh.data.store.to_float`). When
the whole decoded store fits in ``device_fraction`` of the card's memory it is copied to the card
once and batches are gathered there, so nothing but the per-image parameters crosses the bus.

Prefetch (default on CUDA): one worker thread prepares batch i+1 on a side CUDA stream while the
training step of batch i runs; the consumer's stream waits on an event, the host does not. On the
CPU the default is no thread: the transforms are compute on the same cores the trial owns, so a
second thread would only compete with the training step (``tune-clipfh bench``, line 3).

All randomness comes from one CPU ``torch.Generator`` (seeded per epoch), drawn in sampler order
on the calling thread, so batches are the same with and without prefetch, and bit-identical
between runs on the CPU.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .store import (
    Augment,
    ImageStore,
    PixelSource,
    clip_statistics,
    draw_augment,
    flip_plan,
    gather_images,
    to_float,
)

DEVICE_FRACTION = 0.1  # keep the store on a CUDA card when it takes at most this share of it
_UPLOAD_ROWS = 256  # images per host-to-device copy while uploading the store


@dataclass(frozen=True)
class _Sent:
    """A batch on its way: the pixels' source and the per-image numbers, on the device."""

    source: PixelSource
    small: torch.Tensor
    count: int
    augmented: bool
    flipped: int


def fits_on_device(store_bytes: int, device: torch.device,
                   fraction: float = DEVICE_FRACTION) -> bool:
    """Whether a store of ``store_bytes`` should live on ``device``: CUDA only, at most
    ``fraction`` of the card's total memory."""
    if device.type != "cuda":
        return False
    return store_bytes <= fraction * torch.cuda.get_device_properties(device).total_memory


class BatchLoader:
    """Float image batches [B,3,H,W] on ``device`` from rows of an :class:`ImageStore`.

    ``rows``: the store rows of the training images; :meth:`epoch` takes batches of positions
    into them (what the samplers yield). ``normalize``: CLIP mean/std, or [0,1] pixels when
    False (the B1 as-run switch). ``channels_last``: the batches' memory format.
    ``generator_seed`` seeds the augmentation generator (:meth:`epoch` may re-seed it).

    ``on_device``: keep the whole store on the device (None: when :func:`fits_on_device`).
    ``prefetch``: prepare one batch ahead in a worker thread (None: on CUDA only).
    """

    def __init__(self, store: ImageStore, rows: np.ndarray, device: torch.device | str,
                 augment: Augment | None = None, normalize: bool = True,
                 channels_last: bool = False, generator_seed: int = 0, *,
                 on_device: bool | None = None, prefetch: bool | None = None,
                 device_fraction: float = DEVICE_FRACTION):
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.augment = augment or Augment(hflip=0.0)
        self.normalize = normalize
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch.Generator().manual_seed(generator_seed)
        count, self.height, self.width, channels = store.images.shape
        if channels != 3:
            raise ValueError(f"the image store holds {channels}-channel images; expected RGB")
        self._count = count
        self._cuda = self.device.type == "cuda"
        self.prefetch = self._cuda if prefetch is None else prefetch
        self._stream = torch.cuda.Stream(self.device) if self._cuda and self.prefetch else None
        self._statistics = clip_statistics(self.device)
        # Windows of a shifted crop reach pad_crop pixels (3 bytes each) past an image row.
        self._margin = 3 * self.augment.pad_crop
        if on_device is None:
            on_device = fits_on_device(store.images.nbytes, self.device, device_fraction)
        self.resident: PixelSource | None = self._upload() if on_device else None

    # ---------------------------------------------------------------- public
    def epoch(self, batches: Iterable, seed: int | None = None
              ) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """Augmented training batches: yields (images [B,3,H,W] float32 on the device,
        positions) per batch of ``batches`` (positions into ``rows``), in order, one batch
        prepared ahead when prefetching. ``seed`` re-seeds the generator first."""
        if seed is not None:
            self.generator.manual_seed(seed)

        def jobs():
            for batch in batches:
                positions = np.asarray(batch, dtype=np.int64)
                params = None
                if self.augment.active:  # drawn here, in sampler order
                    params = draw_augment(self.generator, len(positions), self.augment,
                                          self.height, self.width)
                yield positions, self._job(self.rows[positions], params, self.normalize)

        yield from self._pipeline(jobs())

    def evaluation(self, rows: np.ndarray, batch_size: int, normalize: bool | None = None
                   ) -> Iterator[torch.Tensor]:
        """Store ``rows`` in consecutive batches of ``batch_size``, not augmented, normalised
        (``normalize``: None for the loader's own switch), prefetched like :meth:`epoch`."""
        rows = np.asarray(rows, dtype=np.int64)
        flag = self.normalize if normalize is None else normalize

        def jobs():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                yield None, self._job(chunk, None, flag)

        for images, _ in self._pipeline(jobs()):
            yield images

    def plain(self, rows: np.ndarray, normalize: bool | None = None) -> torch.Tensor:
        """One batch of store ``rows``, not augmented (see :meth:`evaluation`)."""
        flag = self.normalize if normalize is None else normalize
        return self._finish(self._job(np.asarray(rows, dtype=np.int64), None, flag)())

    def close(self) -> None:
        """Release the device copy of the store."""
        self.resident = None

    # ---------------------------------------------------------------- producing a batch
    def _job(self, store_rows: np.ndarray, params: torch.Tensor | None, normalize: bool
             ) -> Callable[[], tuple[torch.Tensor, torch.cuda.Event | None]]:
        if len(store_rows) and (store_rows.min() < 0 or store_rows.max() >= self._count):
            raise IndexError(f"store rows must be in [0, {self._count}); got "
                             f"{store_rows.min()}..{store_rows.max()}")
        return lambda: self._produce(store_rows, params, normalize)

    def _produce(self, store_rows: np.ndarray, params: torch.Tensor | None, normalize: bool
                 ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Gather, copy and transform one batch (on the side stream when there is one)."""
        if self._stream is None:
            return self._transform(store_rows, params, normalize), None
        with torch.cuda.stream(self._stream):
            images = self._transform(store_rows, params, normalize)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return images, ready

    def _transform(self, store_rows: np.ndarray, params: torch.Tensor | None,
                   normalize: bool) -> torch.Tensor:
        return self._build(self._send(store_rows, params), normalize)

    def _send(self, store_rows: np.ndarray, params: torch.Tensor | None) -> _Sent:
        """The host's share of a batch: gather the uint8 rows (unless the store is resident),
        pack the per-image numbers, and launch the non-blocking copies to the device."""
        count = len(store_rows)
        # The per-image numbers travel as one small tensor: the store rows (or batch positions),
        # the augmentation parameters, and the flip plan.
        parts = [torch.from_numpy(store_rows) if self.resident is not None
                 else torch.arange(count)]
        flipped = 0
        if params is not None:
            plan = flip_plan(params)
            flipped = len(plan[0])
            parts += [params.flatten(), *plan]
        small = torch.cat(parts)
        if self._cuda:
            small = small.pin_memory()
        if self.resident is not None:
            source = self.resident
        else:
            source = self._stage(store_rows).to(self.device, non_blocking=True)
        return _Sent(source, small.to(self.device, non_blocking=True), count,
                     params is not None, flipped)

    def _build(self, sent: _Sent, normalize: bool) -> torch.Tensor:
        """The device's share: gather, flip, shift, erase, normalise (queued, on CUDA)."""
        count, small = sent.count, sent.small
        index, params, plan = small[:count], None, None
        if sent.augmented:
            params = small[count:count * 8].view(count, 7)
            tail = small[count * 8:]
            plan = (tail[:sent.flipped], tail[sent.flipped:])
        pixels, keep = gather_images(sent.source, index, params, plan)
        return to_float(pixels.permute(0, 3, 1, 2), normalize, self.memory_format,
                        self._statistics, keep if self.augment.masks else None)

    def _stage(self, store_rows: np.ndarray) -> PixelSource:
        """The uint8 rows gathered on the host into one (pinned, on CUDA) buffer."""
        staged = PixelSource.empty(len(store_rows), self.height, self.width, 3,
                                   margin=self._margin, pin_memory=self._cuda)
        # mode="clip": no buffered copy (rows were checked in _job).
        np.take(self.store.images, store_rows, axis=0, out=staged.images.numpy(), mode="clip")
        return staged

    def _upload(self) -> PixelSource:
        """The whole store as one uint8 tensor on the device, copied in chunks."""
        resident = PixelSource.empty(self._count, self.height, self.width, 3,
                                     device=self.device, margin=self._margin)
        images = resident.images
        for start in range(0, self._count, _UPLOAD_ROWS):
            chunk = np.array(self.store.images[start:start + _UPLOAD_ROWS])
            images[start:start + len(chunk)].copy_(torch.from_numpy(chunk))
        return resident

    # ---------------------------------------------------------------- prefetch
    def _pipeline(self, jobs: Iterator) -> Iterator[tuple[torch.Tensor, np.ndarray | None]]:
        if not self.prefetch:
            for tag, job in jobs:
                yield self._finish(job()), tag
            return
        if self._stream is not None:
            # The side stream sees everything queued before (e.g. the store upload).
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-loader") as worker:
            pending: deque[tuple[np.ndarray | None, Future]] = deque()
            try:
                for tag, job in jobs:
                    pending.append((tag, worker.submit(job)))
                    if len(pending) > 1:
                        done_tag, done = pending.popleft()
                        yield self._finish(done.result()), done_tag
                while pending:
                    done_tag, done = pending.popleft()
                    yield self._finish(done.result()), done_tag
            finally:
                for _, future in pending:
                    future.cancel()

    def _finish(self, produced) -> torch.Tensor:
        images, ready = produced
        if ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            images.record_stream(stream)
        return images
