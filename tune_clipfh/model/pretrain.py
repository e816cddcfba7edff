"""Contrastive image-text pretraining of the tiny backbones: ``pretrained: synthetic``.

The tiny profile has no OpenAI weights. This module gives it a counterpart: CLIP's own recipe
(symmetric InfoNCE between image and caption embeddings, learnable logit scale, AdamW, linear
warm-up then cosine decay) on a synthetic captioned corpus, so that both towers start from
something learnt, the text tower included. Each backbone's numbers (corpus size, steps, rate)
are the ``recipe`` of its registry entry (:class:`.registry.Recipe`).

Policies:

* The corpus: ``Recipe.identities`` identities drawn by the hand generator
  (:func:`tune_clipfh.data.synth.render`) in identity namespace ``Recipe.namespace`` (1), which
  no evaluation dataset uses (they all use 0): other ids, other random streams. Images are
  drawn in memory, JPEG-compressed and resized exactly as the image store prepares evaluation
  images (so the pixel statistics match), and each gets a caption from its own attributes
  (:mod:`tune_clipfh.data.captions`).
* The loss: per batch, each distinct caption is encoded once. Image -> text is a
  cross-entropy over the batch's distinct captions; text -> image spreads the target evenly over
  the images sharing that caption (identities with the same coarse attributes are not
  negatives of each other). The two directions are averaged, as in CLIP.
* Deterministic for a seed, across machines: the model initialisation, the corpus and the batch
  order come from the seed alone (the global torch RNG is left as it was), and the build runs
  on the CPU in a child process whose numerics are pinned (:data:`BUILD_NUMERICS`). Left
  alone, torch, MKL and oneDNN pick kernels by the CPU's instruction set and the thread count,
  and hundreds of training steps turn their rounding differences into other weights (measured:
  an AVX-512 machine's build differed from an AVX2 machine's in 134 of 153 tensors).
* Cached under ``<cache>/pretrained/`` (TUNE_CLIPFH_CACHE or ~/.cache/tune-clipfh), in a file
  named after the architecture, the seed and a hash of the generator version, the recipe and
  the architecture config. A state dict of ``open_clip.create_model(arch,
  force_quick_gelu=True)``, loadable as ``pretrained: <path>``; a JSON beside it records how it
  was made. Written under a temporary name and renamed; a file lock makes concurrent builders
  (Ray trials) build once and share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..data.captions import caption
from ..data.prepared import default_cache_dir
from ..data.store import to_float
from ..data.synth import GENERATOR_VERSION, JPEG_QUALITY, render
from ..resources import resource_path
from . import open_clip_configs  # noqa: F401  (registers the tiny configs with open_clip)
from .errors import ModelLoadError
from .registry import Recipe, backbone_spec

try:
    import fcntl
except ImportError:  # Windows has no fcntl: no lock, concurrent first builds may each build
    fcntl = None

PRETRAIN_FORMAT = 2
"""Bump when the same recipe would train or store differently (the cache key includes it).
2: floating-point tensors stored in fp16, as OpenAI ships CLIP (half the size; the shipped files
stay under 10 MB)."""
SYNTHETIC_SEED = 0
"""The seed of the weights ``pretrained: synthetic`` stands for (one fixed file, like openai)."""
PRETRAINED_DIR = "pretrained"
MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps its learnt temperature at 100
BUILD_THREADS = 2
BUILD_NUMERICS = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorised kernels
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility branch (matmuls)
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's kernels (convolutions)
    "OMP_NUM_THREADS": str(BUILD_THREADS),
    "MKL_NUM_THREADS": str(BUILD_THREADS),
}
"""The environment of the build's child process: the same kernels and thread count on every
x86-64 machine with AVX2 (each library reads its variable once, before its first use, hence a
child process). The shipped files were built so; a build on an AVX-512 machine under these
settings reproduces them tensor for tensor (measured), at about 1.6x the unpinned time."""


def recipe_of(backbone_key: str) -> Recipe:
    """The registry's pretraining recipe of a backbone, or a one-line error saying what to add."""
    recipe = backbone_spec(backbone_key).recipe
    if recipe is None:
        raise ModelLoadError(f"pretrained: synthetic: backbone {backbone_key} has no pretraining "
                             f"recipe; add recipe=Recipe(...) to its BackboneSpec in "
                             f"model/registry.py (or use pretrained: none or a weights file)")
    return recipe


@dataclass
class Corpus:
    pixels: torch.Tensor  # uint8 [M, 3, S, S]: the drawn rows
    identities: np.ndarray  # str [M]
    captions: list[str]  # the distinct captions of the drawn rows, sorted
    caption_index: torch.Tensor  # long [M]: each drawn image's caption in ``captions``
    size: int  # rows of the whole corpus (the batch order draws from all of them)
    slot: torch.Tensor | None = None  # long [size]: each row's place among the drawn ones

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pixels and caption indices of corpus ``rows``."""
        drawn = rows if self.slot is None else self.slot[rows]
        return self.pixels[drawn], self.caption_index[drawn]


def build_corpus(recipe: Recipe, seed: int, image_size: int, progress: bool = False,
                 rows: torch.Tensor | None = None) -> Corpus:
    """Draw the captioned corpus in memory, pixels prepared as the image store prepares them;
    ``rows``: only those (a replay draws what its first batches take; the pixels, and the order
    of a batch's distinct captions, are those of the whole corpus)."""
    size = recipe.identities * recipe.images_per_identity * len(recipe.aspects)
    wanted = None if rows is None else torch.unique(rows)
    count = size if wanted is None else len(wanted)
    pixels = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    texts, identities = [], []
    drawn = render(recipe.identities, recipe.images_per_identity, seed, recipe.render_size,
                   aspects=recipe.aspects, namespace=recipe.namespace,
                   rows=None if wanted is None else set(wanted.tolist()))
    for row, hand in enumerate(tqdm(drawn, total=count, desc="pretraining corpus",
                                    disable=not progress, leave=False)):
        pixels[row] = _as_stored(hand.image, image_size)
        texts.append(caption(hand.attributes, recipe.caption_fields))
        identities.append(hand.attributes.id)
    captions = sorted(set(texts))
    position = {text: k for k, text in enumerate(captions)}
    slot = None
    if wanted is not None:
        slot = torch.full((size,), -1, dtype=torch.long)
        slot[wanted] = torch.arange(count)
    return Corpus(
        pixels=torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
        identities=np.array(identities),
        captions=captions,
        caption_index=torch.tensor([position[t] for t in texts], dtype=torch.long),
        size=size, slot=slot,
    )


def _as_stored(image: Image.Image, size: int) -> np.ndarray:
    """The pixels an evaluation image reaches the model with: a JPEG file (synthesize), decoded
    and squashed to size x size with bilinear resampling (the image store)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB").resize((size, size),
                                                        Image.Resampling.BILINEAR))


def batch_order(count: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` batches of image indices: a fresh seeded permutation per pass over the corpus;
    every batch holds ``min(batch_size, count)`` distinct images."""
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, count)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < size:
            order = torch.randperm(count, generator=generator)
        yield order[:size]
        order = order[size:]


def first_batches(count: int, recipe: Recipe, seed: int, steps: int) -> Iterator[torch.Tensor]:
    """The first ``steps`` batches of the recipe's batch order over ``count`` images."""
    return itertools.islice(batch_order(count, recipe.batch_size, recipe.steps, seed), steps)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     caption_index: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE with repeated captions: ``text_features`` [U, D] are the
    batch's distinct captions, ``caption_index`` [B] gives each image's row among them."""
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(
        text_features, dim=-1).T  # [B, U]
    image_to_text = F.cross_entropy(logits, caption_index)
    targets = F.one_hot(caption_index, len(text_features)).T.float()  # [U, B]
    targets = targets / targets.sum(dim=1, keepdim=True)
    text_to_image = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def create_model(arch: str, seed: int) -> open_clip.CLIP:
    """The architecture the backbone factory builds, initialised from ``seed`` alone."""
    with torch.random.fork_rng(devices=[]), _without_random_init_warning():
        torch.manual_seed(seed)
        return open_clip.create_model(arch, force_quick_gelu=True)


@contextlib.contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """open_clip warns that the model is "initialized randomly": here that is the point."""
    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def train_contrastive(model: open_clip.CLIP, tokenizer: Callable, corpus: Corpus, recipe: Recipe,
                      seed: int, device: torch.device | str = "cpu", progress: bool = False, *,
                      channels_last: bool, stop_after: int | None = None) -> list[float]:
    """Pretrain ``model`` in place; return the loss of every step. ``channels_last``: train in
    channels-last memory (convolutional towers run about a quarter faster so, on CPUs too).
    ``stop_after``: end after that many steps of the recipe's schedule (a replay's check)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format).train()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        # as open_clip's training: no decay on gains, biases, norms and the temperature
        plain = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
        (no_decay if plain or name == "logit_scale" else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6, foreach=True)  # CPUs default to a slower loop
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, recipe.warmup_steps, recipe.steps))
    tokens = tokenizer(corpus.captions)
    losses = []
    steps = recipe.steps if stop_after is None else min(stop_after, recipe.steps)
    bar = tqdm(total=steps, desc="contrastive pretraining", disable=not progress, leave=False)
    for rows in first_batches(corpus.size, recipe, seed, steps):
        pixels, caption_index = corpus.take(rows)
        distinct, index = torch.unique(caption_index, return_inverse=True)
        images = to_float(pixels.to(device), memory_format=memory_format)
        loss = contrastive_loss(model.encode_image(images),
                                model.encode_text(tokens[distinct].to(device)),
                                index.to(device), model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    model.to(memory_format=torch.contiguous_format).eval()
    return losses


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_model(backbone_key: str, recipe: Recipe, seed: int, progress: bool = False,
                   stop_after: int | None = None) -> tuple[open_clip.CLIP, list[float], Corpus]:
    """Build the corpus and pretrain a fresh tiny ``backbone_key`` on it on the CPU (no
    cache); ``stop_after`` steps only, if given, on the corpus rows those steps take."""
    spec = backbone_spec(backbone_key)
    arch = spec.tiny_arch
    image_size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    rows = None
    if stop_after is not None:
        size = recipe.identities * recipe.images_per_identity * len(recipe.aspects)
        rows = torch.cat(list(first_batches(size, recipe, seed, stop_after)))
    corpus = build_corpus(recipe, seed, image_size, progress, rows=rows)
    model = create_model(arch, seed)
    losses = train_contrastive(model, open_clip.get_tokenizer(arch), corpus, recipe, seed,
                               progress=progress, channels_last=spec.tower == "resnet",
                               stop_after=stop_after)
    return model, losses, corpus


def cache_key(arch: str, recipe: Recipe, seed: int) -> str:
    """Hash of what decides the weights: formats, generator version, recipe, seed, arch config."""
    facts = {"format": PRETRAIN_FORMAT, "generator": GENERATOR_VERSION, "seed": seed,
             "arch": arch, "arch_config": open_clip.get_model_config(arch),
             "recipe": dataclasses.asdict(recipe)}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def weights_path(backbone_key: str, cache_dir: str | os.PathLike | None = None, seed: int = 0,
                 recipe: Recipe | None = None) -> Path:
    """Where the weights of this backbone, seed and recipe are (or will be) cached."""
    arch = backbone_spec(backbone_key).tiny_arch
    recipe = recipe or recipe_of(backbone_key)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    name = f"synthetic-{arch}-seed{seed}-{cache_key(arch, recipe, seed)}.pt"
    return cache / PRETRAINED_DIR / name


def pretrain(backbone_key: str, cache_dir: str | os.PathLike | None = None, seed: int = 0,
             progress: bool = True, *, recipe: Recipe | None = None, force: bool = False,
             log: Callable[[str], None] | None = None) -> Path:
    """The cached synthetic-pretrained weights of the tiny ``backbone_key``: built (one line
    says so) when missing or when ``force``, else reused. Returns the file's path."""
    log = log or _stderr
    recipe = recipe or recipe_of(backbone_key)
    path = weights_path(backbone_key, cache_dir, seed, recipe)
    if path.is_file() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock(path):
        if path.is_file() and not force:  # another process built it while we waited
            return path
        arch = backbone_spec(backbone_key).tiny_arch
        log(f"[model] pretraining the tiny {backbone_key} ({arch}) on synthetic captioned hands "
            f"({recipe.identities} identities, {recipe.steps} steps), once; cached as {path}")
        done = _run_pinned({"backbone": backbone_key, "seed": seed, "recipe": recipe,
                            "path": str(path), "progress": progress})
        if done.returncode != 0 or not path.is_file():
            raise RuntimeError(f"pretraining the tiny {backbone_key} failed (exit "
                               f"{done.returncode}); its output is above")
    return path


def replay_first_steps(backbone_key: str, steps: int, seed: int = 0,
                       recipe: Recipe | None = None) -> list[float]:
    """The losses of a build's first ``steps`` steps, run as a build runs (pinned child, the
    recipe's whole schedule): equal to the first entries of the record's ``loss_curve`` unless
    the corpus, the model, the loss or the optimisation changed. Seconds instead of minutes."""
    done = _run_pinned({"backbone": backbone_key, "seed": seed,
                        "recipe": recipe or recipe_of(backbone_key), "replay_steps": steps},
                       capture=True)
    if done.returncode != 0:
        raise RuntimeError(f"replaying the tiny {backbone_key}'s pretraining failed (exit "
                           f"{done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_pinned(job: dict, capture: bool = False) -> subprocess.CompletedProcess:
    """Run this module's child (see the ``__main__`` block) under :data:`BUILD_NUMERICS`."""
    job = {**job, "recipe": dataclasses.asdict(job["recipe"])}
    return subprocess.run([sys.executable, "-m", __name__, json.dumps(job)],
                          env={**os.environ, **BUILD_NUMERICS}, check=False,
                          capture_output=capture, text=capture)


def _build(backbone_key: str, seed: int, recipe: Recipe, path: Path, progress: bool) -> None:
    """Pretrain on the CPU and write the weights and their record (in the pinned child)."""
    arch = backbone_spec(backbone_key).tiny_arch
    started = time.perf_counter()
    model, losses, corpus = pretrain_model(backbone_key, recipe, seed, progress)
    record = {"backbone": backbone_key, "arch": arch, "seed": seed,
              "generator_version": GENERATOR_VERSION, "format": PRETRAIN_FORMAT,
              "recipe": dataclasses.asdict(recipe), "images": corpus.size,
              "distinct_captions": len(corpus.captions),
              "loss_first": losses[0], "loss_last": losses[-1],
              "loss_last_10_mean": float(np.mean(losses[-10:])), "loss_curve": losses,
              "logit_scale": model.logit_scale.detach().exp().item(),
              "seconds": round(time.perf_counter() - started, 1), "device": "cpu",
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__, "open_clip": open_clip.__version__}
    _atomic_write(path.with_suffix(".json"),
                  lambda f: f.write(json.dumps(record, indent=1).encode()))
    _atomic_write(path, lambda f: torch.save(half_state_dict(model), f))


def half_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with floating-point tensors in fp16; open_clip loads it into fp32."""
    return {name: value.half() if value.is_floating_point() else value
            for name, value in model.state_dict().items()}


def synthetic_weights(backbone_key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """What ``pretrained: synthetic`` means: the fixed-seed weights. The package ships them
    for the measured recipes (``resources/pretrained/``, the very file ``tune-clipfh pretrain``
    writes: same name, same tensors); any other recipe or generator version is built on first
    use and cached."""
    shipped = shipped_weights(backbone_key)
    if shipped is not None:
        return shipped
    return pretrain(backbone_key, cache_dir, seed=SYNTHETIC_SEED, progress=False)


def shipped_weights(backbone_key: str) -> Path | None:
    """The packaged file for the fixed seed and today's recipe, or None."""
    name = weights_path(backbone_key, "/", SYNTHETIC_SEED).name
    path = resource_path(PRETRAINED_DIR, name)
    return path if path.is_file() else None


def _atomic_write(path: Path, write: Callable) -> None:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with tmp.open("wb") as handle:
            write(handle)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with path.with_suffix(".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":  # the pinned child (see ``_run_pinned``): a build or a replay
    _job = json.loads(sys.argv[1])
    _recipe = Recipe(**{key: tuple(value) if isinstance(value, list) else value
                        for key, value in _job["recipe"].items()})
    if "replay_steps" in _job:
        _losses = pretrain_model(_job["backbone"], _recipe, _job["seed"],
                                 stop_after=_job["replay_steps"])[1]
        print(json.dumps(_losses))
    else:
        _build(_job["backbone"], _job["seed"], _recipe, Path(_job["path"]), _job["progress"])
