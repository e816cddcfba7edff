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
* Transforms run on whole torch batches (no PIL in the training loop) and take all
  their randomness from a ``torch.Generator``, so augmentation is seeded.
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
import torch.nn.functional as F
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
    except Exception as exc:  # noqa: BLE001
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
    pixels = batch.to(torch.float32).div_(255)
    if not normalize:
        return pixels
    mean = torch.tensor(CLIP_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=batch.device).view(1, 3, 1, 1)
    return pixels.sub_(mean).div_(std)


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


def augment(batch: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Randomly augment a float batch [B,3,H,W]; returns a new tensor.

    Padding and erasing fill with 0, which is the mean colour on normalized input.
    """
    out = batch.clone()
    if aug.hflip > 0:
        flip = _uniform(generator, len(out)).to(out.device) < aug.hflip
        out[flip] = out[flip].flip(-1)
    if aug.pad_crop > 0:
        out = _pad_crop(out, aug.pad_crop, generator)
    if aug.random_erasing > 0:
        _erase(out, aug.random_erasing, generator)
    return out


def _uniform(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=generator, device=generator.device)


def _pad_crop(batch: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    n, _, height, width = batch.shape
    padded = F.pad(batch, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=generator.device)
    # One slice copy per image: ~10x faster on the CPU than one gather with advanced indices,
    # which took most of the input pipeline's time (`tune-clipfh bench`, line 3).
    cropped = torch.empty(batch.shape, dtype=batch.dtype, device=batch.device)
    for image, (top, left) in enumerate(offsets.T.tolist()):
        cropped[image] = padded[image, :, top:top + height, left:left + width]
    return cropped


def _erase(batch: torch.Tensor, probability: float, generator: torch.Generator) -> None:
    _, _, height, width = batch.shape
    for image, (chance, area_u, aspect_u, top_u, left_u) in enumerate(
        _uniform(generator, len(batch), 5).tolist()
    ):
        if chance >= probability:
            continue
        area = height * width * (ERASE_AREA[0] + area_u * (ERASE_AREA[1] - ERASE_AREA[0]))
        log_low, log_high = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
        aspect = math.exp(log_low + aspect_u * (log_high - log_low))
        box_h = min(height, max(1, round(math.sqrt(area * aspect))))
        box_w = min(width, max(1, round(math.sqrt(area / aspect))))
        top = int(top_u * (height - box_h + 1))
        left = int(left_u * (width - box_w + 1))
        batch[image, :, top : top + box_h, left : left + box_w] = 0
