"""A prepared dataset ready for training: manifest + decoded image store + integer rows.

``resolve_data_dir`` turns the configuration's ``data_dir`` into a prepared folder; with no
``data_dir`` it builds the embedded synthetic dataset under the cache folder (saying so), so a
fresh clone trains with no other step. ``load_prepared`` maps every part of the manifest onto
rows of one shared uint8 store, decoded once per (manifest, resolution).

``load_prepared(..., identity_set=...)`` picks the training identities: ``"val_held_out"``
(validation identities held out of training; selection on them) or ``"upstream_all_train"``
(upstream's set: every training identity trains, no validation set; upstream selected on test
split 1, ``select_on: test_split0``). ``val_fold`` (0: as prepared) then picks which training
identities validate (`validation_fold_view`). Every view of one manifest references the same
files, so they share one decoded store. `identity_set_for` maps ``select_on`` onto the set it
needs. Given a configuration's ``dataset`` and ``aspect``, ``load_prepared`` refuses a folder
prepared for others (`check_prepared_for`) before it decodes anything.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._splits import validation_fold_view
from .errors import DataError
from .hands11k import prepare_11k
from .manifest import (
    IDENTITY_SETS,
    MANIFEST_NAME,
    UPSTREAM_ALL_TRAIN,
    VAL_HELD_OUT,
    Manifest,
    Sample,
    load_manifest,
    upstream_training_view,
)
from .store import ImageStore
from .synth import synthesize

SYNTHETIC_DEFAULT = {"identities": 160, "images_per_identity": 10, "seed": 0,
                     "aspect": "dorsal_r"}
"""The embedded default dataset, sized like 11k dorsal-right (72 training, 71 test identities):
160 synthetic identities: 80 for testing, 80 for training, of which 16 are held out for
validation, so that model selection does not rest on a handful of identities."""


SYNTHETIC_IDENTITIES_ENV = "TUNE_CLIPFH_SYNTHETIC_IDENTITIES"
"""Overrides the embedded dataset's identity count (the test suite uses 80: same generator,
half the epoch time)."""


def synthetic_default() -> dict:
    """SYNTHETIC_DEFAULT, with the identity count from $TUNE_CLIPFH_SYNTHETIC_IDENTITIES if set."""
    raw = os.environ.get(SYNTHETIC_IDENTITIES_ENV)
    if raw is None:
        return dict(SYNTHETIC_DEFAULT)
    if not raw.isdigit() or int(raw) < 8:
        raise DataError(f"${SYNTHETIC_IDENTITIES_ENV}: {raw!r} is not valid (valid: an integer "
                        f">= 8, or unset for {SYNTHETIC_DEFAULT['identities']})")
    return {**SYNTHETIC_DEFAULT, "identities": int(raw)}


def default_cache_dir() -> Path:
    env = os.environ.get("TUNE_CLIPFH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tune-clipfh"


def synthetic_dataset(cache_dir: Path, identities: int, images_per_identity: int, seed: int,
                      aspect: str, log=print) -> Path:
    """Synthesise and prepare the embedded dataset once; later calls reuse it."""
    name = f"synthetic-{identities}x{images_per_identity}-seed{seed}"
    prepared = cache_dir / name / f"prepared-{aspect}"
    if (prepared / MANIFEST_NAME).is_file():
        return prepared
    log(f"[data] synthetic dataset not found: creating {identities} identities x "
        f"{images_per_identity} images under {cache_dir / name}")
    raw = cache_dir / name / "raw"
    if not (raw / "HandInfo.csv").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename, so an interrupted run leaves no half dataset.
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
        synthesize(staging, identities=identities, images_per_identity=images_per_identity,
                   seed=seed, progress=False)
        raw.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging, raw)
        except OSError:  # another process won the race; use its copy
            shutil.rmtree(staging, ignore_errors=True)
    prepare_11k(raw, aspect, prepared, seed=seed, progress=False)
    return prepared


def resolve_data_dir(data_dir: str | None, cache_dir: str | None = None, log=print) -> Path:
    """Absolute folder holding manifest.json (Ray trials run in their own working dirs)."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if data_dir is None:
        return synthetic_dataset(cache, log=log, **synthetic_default()).resolve()
    path = Path(data_dir).expanduser().resolve()
    if not path.exists():
        raise DataError(f"data_dir {data_dir}: path does not exist (expected a folder "
                        f"written by `tune-clipfh data prepare`)")
    if not (path / MANIFEST_NAME).is_file() and not path.name == MANIFEST_NAME:
        raise DataError(f"data_dir {data_dir}: no {MANIFEST_NAME} in it (run `tune-clipfh "
                        f"data prepare --src {data_dir} --out DIR` and point data_dir at DIR)")
    return path


IDENTITY_SET_FOR_SELECT_ON = {"val": VAL_HELD_OUT, "test_split0": UPSTREAM_ALL_TRAIN}
"""Selection on held-out training identities needs them held out; upstream's selection on test
split 1 went with training on every training identity (B11)."""


def identity_set_for(select_on: str) -> str:
    """The identity set a run with this ``select_on`` trains on (see IDENTITY_SET_FOR_SELECT_ON)."""
    return IDENTITY_SET_FOR_SELECT_ON[select_on]


def check_prepared_for(manifest: Manifest, dataset: str | None, aspect: str | None,
                       data_dir) -> None:
    """One-line DataError unless ``data_dir`` was prepared from ``dataset`` and, where it has
    an aspect (11k; HD has none), for ``aspect``: the configuration's knobs of those names
    (None: not checked)."""
    wanted = {"dataset": dataset, "aspect": aspect}
    prepared = {"dataset": manifest.dataset, "aspect": manifest.aspect}
    for key, value in wanted.items():
        if None not in (value, prepared[key]) and prepared[key] != value:
            raise DataError(f"data_dir {data_dir}: key '{key}': {value}, but the folder was "
                            f"prepared for {prepared[key]} (set {key}: {prepared[key]}, or "
                            f"prepare a folder with --{key} {value})")


def with_identity_set(manifest: Manifest, identity_set: str | None, source: str) -> Manifest:
    """The manifest viewed as ``identity_set`` (None: as prepared); one-line DataError if it
    cannot be (a manifest prepared without validation identities has none to hold out)."""
    if identity_set is None or identity_set == manifest.identity_set:
        return manifest
    if identity_set == UPSTREAM_ALL_TRAIN:
        return upstream_training_view(manifest)
    if identity_set == VAL_HELD_OUT:
        raise DataError(f"{source}: prepared with identity set {manifest.identity_set!r} (no "
                        f"validation identities), but selecting on validation (select_on: val) "
                        f"needs held-out training identities: prepare it again without "
                        f"identity_set, with --val-fraction in (0, 1)")
    raise DataError(f"{source}: identity_set {identity_set!r} is not valid "
                    f"(valid: {', '.join(IDENTITY_SETS)})")


@dataclass
class QueryGallery:
    query: np.ndarray  # indices into PreparedData.eval_rows
    gallery: np.ndarray


@dataclass
class PreparedData:
    manifest: Manifest
    store: ImageStore
    identities: list[str]  # training identities; label k is identities[k]
    train_rows: np.ndarray
    train_labels: np.ndarray
    val_rows: np.ndarray  # store rows of every validation image (query then gallery)
    val_ids: np.ndarray
    val_split: QueryGallery
    test_rows: np.ndarray  # store rows of every test image, extracted once for all splits
    test_ids: np.ndarray
    test_splits: list[QueryGallery]

    @property
    def image_size(self) -> int:
        return self.store.images.shape[1]

    @property
    def identity_set(self) -> str:
        return self.manifest.identity_set


def _union(parts: list[list[Sample]]) -> tuple[list[Sample], dict[str, int]]:
    index: dict[str, int] = {}
    samples: list[Sample] = []
    for part in parts:
        for sample in part:
            if sample.path not in index:
                index[sample.path] = len(samples)
                samples.append(sample)
    return samples, index


def _indices(samples: list[Sample], index: dict[str, int]) -> np.ndarray:
    return np.array([index[s.path] for s in samples], dtype=np.int64)


def load_prepared(data_dir: str | Path, image_size: int, cache_dir: str | None = None,
                  progress: bool = True, gallery: str = "split",
                  identity_set: str | None = None, val_fold: int = 0,
                  dataset: str | None = None, aspect: str | None = None) -> PreparedData:
    """Load a prepared folder and its decoded store at ``image_size`` pixels.

    ``identity_set`` (None: as prepared) views the manifest as ``"val_held_out"`` or
    ``"upstream_all_train"``; see the module docstring and `identity_set_for`. ``val_fold``
    then picks the validation identities (`validation_fold_view`). ``dataset`` and ``aspect``
    (None: not checked) must be what the folder was prepared for (`check_prepared_for`).
    """
    manifest = load_manifest(data_dir)
    check_prepared_for(manifest, dataset, aspect, data_dir)
    manifest = with_identity_set(manifest, identity_set, str(data_dir))
    manifest = validation_fold_view(manifest, val_fold, str(data_dir))
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    store = ImageStore.build(manifest, image_size, cache / "stores", progress=progress)

    identities = manifest.train_identities()
    label_of = {identity: k for k, identity in enumerate(identities)}
    train_rows = store.rows(manifest.train)
    train_labels = np.array([label_of[s.identity] for s in manifest.train], dtype=np.int64)

    val_samples, val_index = _union([manifest.val.query, manifest.val.gallery])
    val_split = QueryGallery(_indices(manifest.val.query, val_index),
                             _indices(manifest.val.gallery, val_index))

    def gallery_of(split):
        if gallery == "all":
            if split.gallery_all is None:
                raise DataError(f"{data_dir}: eval gallery 'all' needs a manifest prepared "
                                f"with --cross-aspect-gallery")
            return split.gallery_all
        return split.gallery

    test_parts = [part for split in manifest.test_splits
                  for part in (split.query, gallery_of(split))]
    test_samples, test_index = _union(test_parts)
    test_splits = [QueryGallery(_indices(split.query, test_index),
                                _indices(gallery_of(split), test_index))
                   for split in manifest.test_splits]
    if len(identities) < 2:
        raise DataError(f"{data_dir}: the training part has {len(identities)} identities "
                        f"(at least 2 are needed)")
    return PreparedData(
        manifest=manifest, store=store, identities=identities,
        train_rows=train_rows, train_labels=train_labels,
        val_rows=store.rows(val_samples),
        val_ids=np.array([s.identity for s in val_samples], dtype=str),
        val_split=val_split,
        test_rows=store.rows(test_samples),
        test_ids=np.array([s.identity for s in test_samples], dtype=str),
        test_splits=test_splits,
    )

