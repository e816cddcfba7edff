"""The batched input pipeline: transforms against a per-image reference, seeded reproducibility,
prefetch order, the on-device store path (forced on the CPU), and no loop over the images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tune_clipfh.data.loader import BatchLoader, fits_on_device
from tune_clipfh.data.store import (
    ERASE_AREA,
    ERASE_ASPECT,
    ERASE_H,
    ERASE_LEFT,
    ERASE_TOP,
    ERASE_W,
    FLIP,
    SHIFT_X,
    SHIFT_Y,
    Augment,
    ImageStore,
    PixelSource,
    augment,
    draw_augment,
    gather_images,
    normalize,
    to_float,
)

HEIGHT, WIDTH = 20, 24  # not square: rows and columns must not be confused
FULL_AUG = Augment(hflip=0.5, pad_crop=5, random_erasing=0.7)


def _store(count: int = 40, seed: int = 0) -> ImageStore:
    images = np.random.default_rng(seed).integers(0, 256, (count, HEIGHT, WIDTH, 3), np.uint8)
    return ImageStore(images, {}, Path("unused"))


def _reference(image: torch.Tensor, params: list[int], pad: int) -> torch.Tensor:
    """One float image [C,H,W] flipped, padded with zeros, cropped and erased, the plain way."""
    flip, dy, dx, top, left, box_h, box_w = (params[i] for i in (
        FLIP, SHIFT_Y, SHIFT_X, ERASE_TOP, ERASE_LEFT, ERASE_H, ERASE_W))
    if flip:
        image = image.flip(-1)
    _, height, width = image.shape
    padded = F.pad(image, (pad, pad, pad, pad))
    out = padded[:, pad + dy:pad + dy + height, pad + dx:pad + dx + width].clone()
    out[:, top:top + box_h, left:left + box_w] = 0
    return out


def _edge_params(count: int, pad: int) -> torch.Tensor:
    """Parameters that reach every corner case: extreme shifts both ways, boxes on the
    borders, flips with and without shifts."""
    rng = np.random.default_rng(7)
    params = np.zeros((count, 7), dtype=np.int64)
    params[:, FLIP] = np.arange(count) % 2
    params[:, SHIFT_Y] = rng.integers(-pad, pad + 1, count)
    params[:, SHIFT_X] = rng.integers(-pad, pad + 1, count)
    params[:4, SHIFT_Y:SHIFT_X + 1] = [[-pad, -pad], [pad, pad], [-pad, pad], [pad, -pad]]
    params[:, ERASE_H] = rng.integers(0, HEIGHT // 2, count)
    params[:, ERASE_W] = rng.integers(0, WIDTH // 2, count)
    params[:, ERASE_TOP] = HEIGHT - params[:, ERASE_H]  # on the bottom border
    params[::3, ERASE_TOP] = 0
    params[:, ERASE_LEFT] = rng.integers(0, WIDTH // 2, count)
    params[1::3, ERASE_LEFT] = WIDTH - params[1::3, ERASE_W]
    return torch.from_numpy(params)


# --- transforms against the per-image reference ----------------------------------------------


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_uint8_gather_matches_per_image_reference(normalized, channels_last):
    store = _store()
    pad, count = 5, 16
    params = _edge_params(count, pad)
    rows = torch.arange(3, 3 + 2 * count, 2)
    source = PixelSource.empty(len(store), HEIGHT, WIDTH, 3, margin=3 * pad)
    source.images.copy_(torch.from_numpy(store.images))
    pixels, keep = gather_images(source, rows, params)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    got = to_float(pixels.permute(0, 3, 1, 2), normalized, fmt, keep=keep)
    assert got.is_contiguous(memory_format=fmt) and got.dtype == torch.float32
    plain = normalize(store.batch(rows.numpy()), normalized)
    expected = torch.stack([_reference(plain[i], params[i].tolist(), pad) for i in range(count)])
    assert torch.equal(got, expected)  # -0.0 == 0.0: the fill is a product with 0


def test_float_augment_matches_reference_with_its_own_draw():
    batch = torch.randn(12, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))
    got = augment(batch, FULL_AUG, torch.Generator().manual_seed(4))
    params = draw_augment(torch.Generator().manual_seed(4), 12, FULL_AUG, HEIGHT, WIDTH)
    expected = torch.stack([_reference(batch[i], params[i].tolist(), FULL_AUG.pad_crop)
                            for i in range(12)])
    assert torch.equal(got, expected)
    assert params[:, FLIP].any() and params[:, ERASE_H].any() and params[:, SHIFT_X].any()


def test_erased_pixels_are_the_fill_and_nothing_else_changes():
    store = _store()
    loader = BatchLoader(store, np.arange(len(store)), "cpu",
                         Augment(hflip=0.0, random_erasing=1.0), normalize=True)
    torch.manual_seed(0)  # nothing may depend on the global generator
    images, positions = next(loader.epoch([np.arange(8)], seed=3))
    params = draw_augment(torch.Generator().manual_seed(3), 8, loader.augment, HEIGHT, WIDTH)
    plain = normalize(store.batch(positions))
    for i, (_, _, _, top, left, box_h, box_w) in enumerate(params.tolist()):
        erased = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
        erased[top:top + box_h, left:left + box_w] = True
        assert box_h * box_w > 0
        assert (images[i][:, erased] == 0).all()
        assert torch.equal(images[i][:, ~erased], plain[i][:, ~erased])


def test_drawn_parameters_stay_in_their_ranges():
    height, width, pad = 64, 48, 6
    aug = Augment(hflip=0.3, pad_crop=pad, random_erasing=0.6)
    params = draw_augment(torch.Generator().manual_seed(0), 4000, aug, height, width)
    assert params.dtype == torch.int64 and params.shape == (4000, 7)
    assert abs(params[:, FLIP].float().mean() - 0.3) < 0.03
    for column in (SHIFT_Y, SHIFT_X):
        shifts = params[:, column]
        assert shifts.min() == -pad and shifts.max() == pad
        assert set(shifts.tolist()) == set(range(-pad, pad + 1))
    erased = params[params[:, ERASE_H] > 0]
    assert abs(len(erased) / 4000 - 0.6) < 0.03
    box_h, box_w = erased[:, ERASE_H].double(), erased[:, ERASE_W].double()
    assert (erased[:, ERASE_TOP] >= 0).all() and (erased[:, ERASE_TOP] + box_h <= height).all()
    assert (erased[:, ERASE_LEFT] >= 0).all() and (erased[:, ERASE_LEFT] + box_w <= width).all()
    # Area and aspect in range up to the rounding of the sides (and clipping to the image).
    area = box_h * box_w / (height * width)
    assert area.min() >= ERASE_AREA[0] * 0.75 and area.max() <= ERASE_AREA[1] * 1.1
    unclipped = (box_h < height) & (box_w < width)
    aspect = (box_h / box_w)[unclipped]
    slack = 1 / min(height, width) * 2
    assert aspect.min() >= ERASE_ASPECT[0] * (1 - 4 * slack)
    assert aspect.max() <= ERASE_ASPECT[1] * (1 + 4 * slack)
    assert math.isclose(float(area.median()), sum(ERASE_AREA) / 2, rel_tol=0.15)
    off = draw_augment(torch.Generator().manual_seed(0), 100, Augment(hflip=0.0), height, width)
    assert not off[:, FLIP].any() and not off[:, SHIFT_Y:].any()
    always = draw_augment(torch.Generator().manual_seed(0), 100, Augment(hflip=1.0), 8, 8)
    assert always[:, FLIP].all()


# --- the loader -----------------------------------------------------------------------------


def _epoch(loader: BatchLoader, batches, seed: int = 5):
    return [(images.clone(), positions) for images, positions in loader.epoch(batches, seed)]


def _batches(count: int, size: int, number: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(count, size, replace=False) for _ in range(number)]


def test_epoch_matches_the_batched_float_path_and_is_seeded():
    store = _store()
    rows = np.arange(len(store))[::-1].copy()  # positions != store rows
    batches = _batches(len(rows), 6, 5)
    loader = BatchLoader(store, rows, "cpu", FULL_AUG, normalize=True)
    first = _epoch(loader, batches)
    generator = torch.Generator().manual_seed(5)
    for (images, positions), batch in zip(first, batches, strict=True):
        assert np.array_equal(positions, batch)
        expected = augment(normalize(store.batch(rows[batch])), FULL_AUG, generator)
        assert torch.equal(images, expected)
    again = _epoch(loader, batches)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again, strict=True))
    other = _epoch(loader, batches, seed=6)
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(first, other, strict=True))
    # A new loader with the same seed gives the same bits (and a continuing one does not).
    fresh = BatchLoader(store, rows, "cpu", FULL_AUG, normalize=True, generator_seed=9)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, _epoch(fresh, batches),
                                                           strict=True))


@pytest.mark.parametrize(("prefetch", "on_device"), [(True, False), (False, True),
                                                      (True, True)])
def test_prefetch_and_resident_store_give_the_same_batches_in_sampler_order(prefetch,
                                                                            on_device):
    store = _store()
    rows = np.arange(5, len(store))
    batches = _batches(len(rows), 7, 6, seed=2) + [np.array([0])]
    base = BatchLoader(store, rows, "cpu", FULL_AUG, normalize=False, channels_last=True)
    other = BatchLoader(store, rows, "cpu", FULL_AUG, normalize=False, channels_last=True,
                        on_device=on_device, prefetch=prefetch)
    assert (other.resident is not None) is on_device and other.prefetch is prefetch
    expected, got = _epoch(base, batches), _epoch(other, batches)
    assert [p.tolist() for _, p in got] == [b.tolist() for b in batches]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(expected, got, strict=True))
    assert all(images.is_contiguous(memory_format=torch.channels_last) for images, _ in got)


def test_prefetch_stops_cleanly_when_the_consumer_leaves_early():
    store = _store()
    loader = BatchLoader(store, np.arange(len(store)), "cpu", FULL_AUG, prefetch=True)
    epoch = loader.epoch(_batches(len(store), 4, 10))
    next(epoch)
    epoch.close()  # the pending batch is finished or cancelled, the worker thread ends
    images, _ = next(loader.epoch([np.arange(4)]))
    assert images.shape == (4, 3, HEIGHT, WIDTH)


def test_plain_and_evaluation_batches_are_normalized_only():
    store = _store()
    loader = BatchLoader(store, np.arange(len(store)), "cpu", FULL_AUG, normalize=False,
                         on_device=True, prefetch=True)
    rows = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5])
    assert torch.equal(loader.plain(rows), normalize(store.batch(rows), False))
    assert torch.equal(loader.plain(rows, normalize=True), normalize(store.batch(rows)))
    batches = list(loader.evaluation(rows, 4, normalize=True))
    assert [len(b) for b in batches] == [4, 4, 3]
    assert torch.equal(torch.cat(batches), normalize(store.batch(rows)))
    assert torch.equal(loader.plain(rows[:0]), torch.empty(0, 3, HEIGHT, WIDTH))


def test_loader_checks_rows_and_channels():
    store = _store(10)
    loader = BatchLoader(store, np.arange(10), "cpu", FULL_AUG)
    with pytest.raises(IndexError, match="store rows"):
        loader.plain(np.array([10]))
    gray = ImageStore(np.zeros((2, 4, 4, 1), np.uint8), {}, Path("unused"))
    with pytest.raises(ValueError, match="RGB"):
        BatchLoader(gray, np.arange(2), "cpu")


def test_store_stays_on_the_host_for_the_cpu():
    assert not fits_on_device(1, torch.device("cpu"))
    assert BatchLoader(_store(4), np.arange(4), "cpu").resident is None


# --- structure: no loop over the images ------------------------------------------------------


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _ops_for(batch_size: int, on_device: bool) -> int:
    store = _store(64)
    # Every image flipped and erased: a loop over flipped or erased images would show too.
    aug = Augment(hflip=1.0, pad_crop=5, random_erasing=1.0)
    loader = BatchLoader(store, np.arange(64), "cpu", aug, on_device=on_device, prefetch=False)
    with _CountOps() as counter:
        next(loader.epoch([np.arange(batch_size)], seed=0))
    return counter.calls


@pytest.mark.parametrize("on_device", [False, True])
def test_torch_op_count_does_not_grow_with_the_batch(on_device):
    small, large = _ops_for(4, on_device), _ops_for(48, on_device)
    assert small == large, (small, large)
    assert small < 200  # views and slices included
