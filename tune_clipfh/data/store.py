"""Decode-once image store and per-batch tensor transforms.

Policies:

* Every image of a manifest is decoded once, converted to RGB and squashed to
  ``size x size`` with bilinear resampling: CLIP's ModifiedResNet accepts only
  square inputs, and upstream resized the landscape 11k images to 224x224 the same
  way. The result is a uint8 array ``[N, size, size, 3]`` in
  ``<cache_dir>/<key>/images.npy`` plus ``index.json`` (relative path -> row).
* The key hashes the image root, every image's relative path, byte size and
  modification time, and ``size``. It does not depend on the splits or the seed,
  so all runs and trials over the same images share one decoded copy, and a file
  rewritten on disk gets a fresh entry instead of a stale one.
* A build whose key is cached memory-maps the array (``np.load(mmap_mode="r")``)
  and decodes nothing.
* Both files are written under temporary names and renamed; ``index.json`` comes
  last and marks a complete entry, so concurrent builders never read a partial one.
* Transforms run on whole torch batches (no PIL in the training loop, no Python loop over
  the images) on whatever device the batch is on, and take all their randomness from a
  ``torch.Generator``, so augmentation is seeded. :mod:`.loader` feeds them from the store.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ._splits import decode_rgb
from .errors import DataError
from .manifest import Manifest, Sample

CACHE_FORMAT = 1  # bump when the decoded pixels would change
IMAGES_FILE = "images.npy"
INDEX_FILE = "index.json"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Random erasing as in Zhong et al. / torchvision: erased area and aspect ranges.
ERASE_AREA = (0.02, 0.33)
ERASE_ASPECT = (0.3, 3.3)


class ImageStore:
    """Decoded, resized images of one manifest, addressed by row."""

    def __init__(self, images: np.ndarray, rows_by_path: dict[str, int], directory: Path):
        self.images = images
        self.directory = directory
        self._rows_by_path = rows_by_path

    @classmethod
    def build(cls, manifest: Manifest, size: int, cache_dir, progress: bool = True) -> ImageStore:
        if size < 1:
            raise DataError(f"image size must be a positive number of pixels; got {size!r}")
        root = Path(manifest.root)
        paths = sorted({s.path for s in manifest.all_samples()})
        directory = Path(cache_dir) / _cache_key(root, paths, size)
        if not all((directory / name).is_file() for name in (IMAGES_FILE, INDEX_FILE)):
            _decode_into(directory, root, paths, size, progress)
        elif progress:
            print(f"image store: using cached {directory}", file=sys.stderr)
        index = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))
        images = np.load(directory / IMAGES_FILE, mmap_mode="r")
        return cls(images, index["rows"], directory)

    def __len__(self) -> int:
        return len(self.images)

    def rows(self, samples: Sequence[Sample]) -> np.ndarray:
        try:
            return np.array([self._rows_by_path[s.path] for s in samples], dtype=np.int64)
        except KeyError as exc:
            raise KeyError(f"{exc.args[0]} is not in the image store {self.directory}") from None

    def batch(self, rows) -> torch.Tensor:
        """uint8 tensor [B, 3, H, W] of the given rows."""
        pixels = np.ascontiguousarray(self.images[np.asarray(rows, dtype=np.int64)])
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def _cache_key(root: Path, paths: list[str], size: int) -> str:
    digest = hashlib.sha256(f"{CACHE_FORMAT}\n{root.resolve()}\n{size}\n".encode())
    for path in paths:
        try:
            stat = (root / path).stat()
        except OSError:
            raise DataError(f"{root / path}: image listed in the manifest is missing") from None
        digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _decode_into(directory: Path, root: Path, paths: list[str], size: int, progress: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if progress:
        print(
            f"image store: decoding {len(paths)} images to {size}x{size} into {directory}",
            file=sys.stderr,
        )
    start = time.perf_counter()
    tmp = _temp_path(directory, IMAGES_FILE)
    try:
        _decode_to_npy(tmp, root, paths, size)
        os.replace(tmp, directory / IMAGES_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    index = {"root": str(root), "size": size, "rows": {p: i for i, p in enumerate(paths)}}
    tmp = _temp_path(directory, INDEX_FILE)
    tmp.write_text(json.dumps(index), encoding="utf-8")
    os.replace(tmp, directory / INDEX_FILE)
    if progress:
        print(f"image store: decoded in {time.perf_counter() - start:.1f}s", file=sys.stderr)


def _decode_to_npy(file: Path, root: Path, paths: list[str], size: int) -> None:
    images = np.lib.format.open_memmap(
        file, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3)
    )

    def decode_row(row: int) -> None:
        images[row] = _decode_resized(root / paths[row], size)

    # PIL releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(decode_row, range(len(paths))))
    images.flush()


def _decode_resized(path: Path, size: int) -> np.ndarray:
    try:
        image, _ = decode_rgb(path)
    # Decoders raise many exception types on bad data; report any as the file's fault.
    except Exception as exc:
        raise DataError(
            f"{path}: cannot decode image ({type(exc).__name__}: {' '.join(str(exc).split())});"
            " prepare the dataset again to skip broken files"
        ) from None
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


def _temp_path(directory: Path, name: str) -> Path:
    # Unique per writer, so concurrent builders never write into the same file.
    return directory / f".{name}.{uuid.uuid4().hex}.tmp"


def normalize(batch: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32, CLIP-normalized, or plain [0,1] pixels when
    ``normalize=False`` (upstream bug B1, only for the "as-run" switches)."""
    return to_float(batch, normalize)


def clip_statistics(device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP mean and std as [1,3,1,1] float32 tensors on ``device``."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return mean.to(device), std.to(device)


def to_float(pixels: torch.Tensor, normalize: bool = True,
             memory_format: torch.memory_format = torch.preserve_format,
             statistics: tuple[torch.Tensor, torch.Tensor] | None = None,
             keep: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B,3,H,W] (any strides) -> float32 [0,1] pixels, CLIP-normalized if ``normalize``;
    then multiplied by the 0/1 mask ``keep`` [B,1,H,W] (from :func:`gather_images`): 0 is the
    padding and erasing fill, the mean colour on normalized input. ``statistics``: CLIP mean/std
    already on the device (see :func:`clip_statistics`), so that no host-to-device copy is made here."""
    out = pixels.to(torch.float32, memory_format=memory_format).div_(255)
    if normalize:
        mean, std = statistics if statistics is not None else clip_statistics(out.device)
        out.sub_(mean).div_(std)
    if keep is not None:
        out.mul_(keep)  # ~10x faster than masked_fill_ on the CPU; the fill may be -0.0
    return out


@dataclass(frozen=True)
class Augment:
    hflip: float = 0.5  # probability of a horizontal flip
    pad_crop: int = 0  # pixels of zero padding on each side before a random crop back to size
    random_erasing: float = 0.0  # probability of erasing one random rectangle

    def __post_init__(self):
        for name in ("hflip", "random_erasing"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(
                    f"Augment.{name} is a probability in [0, 1]; got {getattr(self, name)!r}"
                )
        if self.pad_crop < 0:
            raise ValueError(f"Augment.pad_crop is a number of pixels >= 0; got {self.pad_crop!r}")

    @property
    def active(self) -> bool:
        return self.hflip > 0 or self.pad_crop > 0 or self.random_erasing > 0

    @property
    def masks(self) -> bool:
        """Whether some pixels may be filled (padding or erasing)."""
        return self.pad_crop > 0 or self.random_erasing > 0


# Columns of the per-image parameters that ``draw_augment`` returns.
FLIP, SHIFT_Y, SHIFT_X, ERASE_TOP, ERASE_LEFT, ERASE_H, ERASE_W = range(7)


def draw_augment(generator: torch.Generator, count: int, aug: Augment, height: int,
                 width: int) -> torch.Tensor:
    """The random parameters of one batch: int64 [count, 7] on the CPU, one row per image.

    Columns (constants of the same names): ``FLIP`` 0/1; ``SHIFT_Y``, ``SHIFT_X`` the crop
    offset minus the padding, in [-pad_crop, pad_crop] (output pixel (y, x) shows the flipped
    image's pixel (y + SHIFT_Y, x + SHIFT_X), 0 outside it); ``ERASE_TOP``, ``ERASE_LEFT``,
    ``ERASE_H``, ``ERASE_W`` the erased rectangle in output pixels (all 0: none). Erasing as in
    Zhong et al. / torchvision: area uniform in ``ERASE_AREA`` of the image, aspect (h/w)
    log-uniform in ``ERASE_ASPECT``, clipped to the image. One draw of 8 uniforms per image from
    ``generator``, whatever is enabled.
    """
    u = torch.rand(count, 8, generator=generator, dtype=torch.float64,
                   device=generator.device).cpu().numpy()
    # A few dozen operations on [count] vectors: NumPy's per-call cost is a fraction of torch's.
    params = np.zeros((count, 7), dtype=np.int64)
    params[:, FLIP] = u[:, 0] < aug.hflip
    pad = aug.pad_crop
    params[:, SHIFT_Y:SHIFT_X + 1] = np.minimum(np.floor(u[:, 1:3] * (2 * pad + 1)), 2 * pad) - pad
    area = height * width * (ERASE_AREA[0] + u[:, 4] * (ERASE_AREA[1] - ERASE_AREA[0]))
    log_low, log_high = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
    aspect = np.exp(log_low + u[:, 5] * (log_high - log_low))
    box_h = np.clip(np.round(np.sqrt(area * aspect)), 1, height)
    box_w = np.clip(np.round(np.sqrt(area / aspect)), 1, width)
    erased = u[:, 3] < aug.random_erasing
    params[:, ERASE_TOP] = np.floor(u[:, 6] * (height - box_h + 1)) * erased
    params[:, ERASE_LEFT] = np.floor(u[:, 7] * (width - box_w + 1)) * erased
    params[:, ERASE_H] = box_h * erased
    params[:, ERASE_W] = box_w * erased
    return torch.from_numpy(params)


@dataclass(frozen=True)
class PixelSource:
    """Images back to back in one flat tensor, with ``margin`` spare elements at each end.

    ``layout`` "hwc" (uint8 store rows, [N,H,W,C]) or "chw" ([N,C,H,W]). The margins let a
    shifted crop read whole rows as windows of the flat memory (``gather_images``): a window that
    starts up to ``margin / pixel`` pixels before an image row or ends after it stays inside the
    tensor (what it reads there is masked out).
    """

    flat: torch.Tensor
    count: int
    height: int
    width: int
    channels: int
    layout: str = "hwc"
    margin: int = 0

    @classmethod
    def empty(cls, count: int, height: int, width: int, channels: int = 3,
              dtype: torch.dtype = torch.uint8, device=None, layout: str = "hwc",
              margin: int = 0, pin_memory: bool = False) -> PixelSource:
        flat = torch.empty(2 * margin + count * height * width * channels, dtype=dtype,
                           device=device, pin_memory=pin_memory)
        if margin:
            flat[:margin].zero_()
            flat[flat.numel() - margin:].zero_()
        return cls(flat, count, height, width, channels, layout, margin)

    @property
    def images(self) -> torch.Tensor:
        """The images as [N,H,W,C] (hwc) or [N,C,H,W] (chw), a view of ``flat``."""
        shape = ((self.count, self.height, self.width, self.channels) if self.layout == "hwc"
                 else (self.count, self.channels, self.height, self.width))
        return self.flat[self.margin:self.flat.numel() - self.margin].view(shape)

    @property
    def pixel(self) -> int:
        """Flat elements from one pixel to the next along a row."""
        return self.channels if self.layout == "hwc" else 1

    def to(self, device, non_blocking: bool = False) -> PixelSource:
        return PixelSource(self.flat.to(device, non_blocking=non_blocking), self.count,
                           self.height, self.width, self.channels, self.layout, self.margin)


def flip_plan(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From :func:`draw_augment`'s parameters: the positions of the flipped images [F] and the
    order [B] that picks each image from (unflipped batch, flipped copies) concatenated."""
    flipped = params[:, FLIP].nonzero().flatten()
    order = torch.arange(len(params), device=params.device)
    order[flipped] = len(params) + torch.arange(len(flipped), device=params.device)
    return flipped, order


def gather_images(source: PixelSource, index: torch.Tensor, params: torch.Tensor | None = None,
                  plan: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images ``index`` [B] of ``source``, flipped and shifted by ``params`` (from
    :func:`draw_augment`, on the source's device; None: as stored), as batched tensor ops.

    Returns the pixels in the source's layout and dtype, and the float32 mask [B,1,H,W] that is 0
    where the output is to be filled with 0 (padding and erased rectangles) and 1 elsewhere (None
    without ``params``). Every output
    row is a window of ``source.flat`` (an overlapping strided view), all picked by one
    ``index_select``; the flipped images are copied, reversed, and put in place by one more
    ``index_select`` with the :func:`flip_plan` ``plan`` (3x faster on the CPU than
    ``index_copy_``, which copies element by element). No loop over the images. Pass ``plan``
    (made on the host) on CUDA: making it from ``params`` there waits for the device.
    """
    count, height, width = len(index), source.height, source.width
    image_elems = source.height * source.width * source.channels
    if params is None:
        images = source.flat[source.margin:source.flat.numel() - source.margin]
        picked = images.view(source.count, image_elems).index_select(0, index)
        return picked.view(count, *source.images.shape[1:]), None
    device = source.flat.device
    ys = torch.arange(height, device=device)
    xs = torch.arange(width, device=device)
    shift_x = params[:, SHIFT_X]
    # Output (y, x) shows flipped-image pixel (y + dy, x + dx), i.e. source pixel
    # (y + dy, x + dx) unflipped or (y + dy, W - 1 - x - dx) flipped: a window of W source
    # pixels starting at column dx (or -dx, then reversed). Rows outside are clamped and masked;
    # a window that starts before an image row reads the previous row's end (masked), and the
    # margins keep the first and last windows inside ``flat`` (index_select raises otherwise).
    source_rows = (ys + params[:, SHIFT_Y:SHIFT_Y + 1]).clamp(0, height - 1)  # [B, H]
    first_column = shift_x - 2 * shift_x * params[:, FLIP]  # [B]
    if source.layout == "hwc":
        row_len = width * source.channels
        planes, plane_elems, row_elems, width_dim = 1, 0, row_len, 2
    else:
        row_len = width
        planes, plane_elems, row_elems, width_dim = source.channels, height * width, width, 3
    start = (source.margin + index[:, None, None] * image_elems
             + torch.arange(planes, device=device)[None, :, None] * plane_elems
             + source_rows[:, None, :] * row_elems
             + (first_column * source.pixel)[:, None, None])
    windows = source.flat.as_strided((source.flat.numel() - row_len + 1, row_len), (1, 1))
    pixels = windows.index_select(0, start.reshape(-1)).view(count, *source.images.shape[1:])
    flipped, order = plan if plan is not None else flip_plan(params)
    if len(flipped):
        reversed_copies = pixels.index_select(0, flipped).flip(width_dim)
        pixels = torch.cat([pixels, reversed_copies]).index_select(0, order)
    return pixels, _keep_mask(params, ys, xs)


def _keep_mask(params: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """float32 [B,1,H,W]: 1 where the output shows the image, 0 outside the shifted image and in
    the erased rectangle, as inside_y * inside_x - erased_y * erased_x (outer products of
    per-row and per-column 0/1 vectors, exact in float): two passes over [B,H,W]."""
    def factors(positions, shift, first, extent):
        moved = positions + shift
        inside = ((moved >= 0) & (moved < len(positions))).float()
        band = ((positions >= first) & (positions < first + extent)).float()
        return inside, inside * band

    inside_y, erased_y = factors(ys, params[:, SHIFT_Y:SHIFT_Y + 1],
                                 params[:, ERASE_TOP:ERASE_TOP + 1], params[:, ERASE_H:ERASE_H + 1])
    inside_x, erased_x = factors(xs, params[:, SHIFT_X:SHIFT_X + 1],
                                 params[:, ERASE_LEFT:ERASE_LEFT + 1],
                                 params[:, ERASE_W:ERASE_W + 1])
    keep = inside_y[:, :, None] * inside_x[:, None, :]
    return keep.addcmul_(erased_y[:, :, None], erased_x[:, None, :], value=-1)[:, None]


def augment(batch: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Randomly augment a float batch [B,C,H,W]; returns a new tensor.

    Horizontal flip, then zero padding and a random crop back to size, then random erasing, all
    batched (see :func:`gather_images`), with the parameters of :func:`draw_augment`. Padding and
    erasing fill with 0, which is the mean colour on normalized input.
    """
    count, channels, height, width = batch.shape
    params = draw_augment(generator, count, aug, height, width).to(batch.device)
    margin = aug.pad_crop
    source = PixelSource.empty(count, height, width, channels, batch.dtype, batch.device, "chw",
                               margin)
    source.images.copy_(batch)
    pixels, keep = gather_images(source, torch.arange(count, device=batch.device), params)
    if aug.masks:
        pixels.mul_(keep.to(pixels.dtype))
    return pixels
