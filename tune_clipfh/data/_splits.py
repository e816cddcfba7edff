"""Preparation steps shared by every dataset (11k Hands, HD).

Policies:

* Image checks: every candidate image is opened with PIL and fully decoded once
  at prepare time. Missing, zero-byte, truncated, unreadable and non-image files
  are SKIPPED: listed in ``report["skipped"]`` with the reason, one warning line
  each on stderr for the first ``MAX_WARNINGS``, then one line saying the rest are
  in the report. When MORE THAN HALF of the listed images are missing, the dataset
  was unpacked or pointed at wrongly: preparation stops with one line saying where
  the images were looked for and where they are, if one folder away (datasets
  build that line; `mostly_missing`, `holding_folder`). Grayscale, RGBA, CMYK, palette and 16-bit images are accepted;
  they are converted to RGB when loaded (`decode_rgb`) and listed in
  ``report["converted"]`` with their original mode. A file listed twice is kept once.
* An identity left with fewer than 2 images is dropped (``report["dropped_identities"]``):
  it can form no query/gallery pair.
* Identity split: ``"half"`` sorts the identities (numerically when all are digit
  strings) and puts the first half (rounded up) in train, the rest in test (B18);
  ``"upstream"`` reproduces the upstream hard-coded ``int(id) <= threshold``.
* Validation (``identity_set="val_held_out"``, the default): ``val_fraction`` of
  the TRAIN identities (at least 2, leaving at least 2 to train on) are held out as
  a query/gallery set with one gallery image per identity. Test identities never
  take part in model selection (B11), so ``val_fraction`` must be in (0, 1): with no
  validation identities no model can be selected.
* ``identity_set="upstream_all_train"`` keeps every training identity in train and
  the validation set empty, as upstream ran (it selected on test split 1: the as-run
  switch ``select_on: test_split0``). Its ``val_fraction`` is 0.
* Test: ``num_splits`` query/gallery splits of the test identities, one random
  gallery image per identity and the rest as queries.
* Every random choice comes from its own numpy stream derived from the seed
  (`stream`), so each part is reproducible on its own (B14): e.g. split 3 does not
  change when ``num_splits`` or ``val_fraction`` change.
* Validation folds (`validation_fold_view`, the knob ``val_fold``): fold 0 is the
  prepared validation set; fold k >= 1 holds out the k-th group of as many of the
  other training identities instead (cross-validation over training identities).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError
from .manifest import (
    IDENTITY_SETS,
    UPSTREAM_ALL_TRAIN,
    VAL_HELD_OUT,
    Manifest,
    Sample,
    Split,
    save_manifest,
    sort_identities,
)

IDENTITY_SPLITS = ("half", "upstream")
DEFAULT_VAL_FRACTION = 0.2
MAX_WARNINGS = 20  # skipped-file warning lines printed; the report lists every one
MOSTLY_MISSING = 0.5  # above this share of missing listed images, stop with one line
MIN_IMAGES_PER_IDENTITY = 2
MIN_VAL_IDENTITIES = 2
MIN_TRAIN_IDENTITIES = 2

# Seed streams: one per random decision, so parts do not shift each other.
VAL_IDENTITIES_STREAM = 0
VAL_GALLERY_STREAM = 1
TEST_SPLIT_STREAM = 2
VAL_FOLD_IDENTITIES_STREAM = 3
VAL_FOLD_GALLERY_STREAM = 4

_INTEGER_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


def stream(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def decode_rgb(path: Path) -> tuple[Image.Image, str]:
    """Fully decode an image file; return it as RGB and its original mode."""
    with Image.open(path) as img:
        img.load()
        return _to_rgb(img), img.mode


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _INTEGER_MODES:
        # PIL would clip 16-bit values at 255 (white); rescale 0..65535 to 0..255.
        values = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL wants palette transparency resolved via RGBA
    return img.convert("RGB")


def validate_options(
    identity_split: str,
    val_fraction: float | None,
    num_splits: int,
    seed: int,
    identity_set: str = VAL_HELD_OUT,
) -> float:
    """Check the preparation options; return the validation fraction to use.

    ``val_fraction=None`` is the identity set's default: 0.2 held out, or 0 for
    ``upstream_all_train``.
    """
    if identity_split not in IDENTITY_SPLITS:
        raise DataError(
            f"identity_split must be one of {', '.join(IDENTITY_SPLITS)}; got {identity_split!r}"
        )
    if identity_set not in IDENTITY_SETS:
        raise DataError(
            f"identity_set must be one of {', '.join(IDENTITY_SETS)}; got {identity_set!r}"
        )
    if identity_set == UPSTREAM_ALL_TRAIN:
        if val_fraction not in (None, 0):
            raise DataError(
                f"val_fraction (--val-fraction) {val_fraction!r} contradicts identity_set"
                f" {UPSTREAM_ALL_TRAIN!r}, which trains on every training identity (leave it"
                " unset or 0)"
            )
        val_fraction = 0.0
    elif val_fraction is None:
        val_fraction = DEFAULT_VAL_FRACTION
    elif not 0 < val_fraction < 1:
        raise ValFractionError(val_fraction)
    if num_splits < 1:
        raise DataError(f"num_splits must be at least 1; got {num_splits!r}")
    if seed < 0:
        raise DataError(f"seed must be a non-negative integer; got {seed!r}")
    return val_fraction


class ValFractionError(DataError):
    """A validation fraction outside (0, 1) for a held-out validation set."""

    def __init__(self, val_fraction: object):
        super().__init__(
            f"val_fraction (--val-fraction) must be in (0, 1), the share of training identities"
            f" held out for validation; got {val_fraction!r}: model selection needs validation"
            f" identities (upstream's selection on test split 1 is the as-run switch select_on:"
            f" test_split0, with identity_set {UPSTREAM_ALL_TRAIN!r})"
        )


def new_report() -> dict:
    return {"skipped": [], "converted": [], "dropped_identities": []}


def checked_samples(candidates: list[Sample], root: Path, report: dict) -> list[Sample]:
    """The candidates whose image decodes completely; the others are reported and skipped."""
    unique = _drop_duplicates(candidates, report)
    usable = []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for sample, (problem, mode) in zip(
            unique, pool.map(lambda s: _inspect(root / s.path), unique), strict=True
        ):
            if problem:
                _skip(report, sample.path, problem)
                continue
            if mode != "RGB":
                report["converted"].append({"file": sample.path, "mode": mode})
            usable.append(sample)
    return usable


def checked_groups(
    candidates: list[Sample], root: Path, report: dict, identity_label: Callable[[str], str] = str
) -> dict[str, list[Sample]]:
    """Usable images grouped by identity, without identities too small to split.

    ``identity_label`` names an identity in the report (e.g. with its aspect).
    """
    groups = _group(checked_samples(candidates, root, report))
    return _drop_small_identities(groups, report, identity_label)


def _drop_duplicates(candidates: list[Sample], report: dict) -> list[Sample]:
    seen: set[str] = set()
    unique = []
    for sample in candidates:
        if sample.path in seen:
            _skip(report, sample.path, "listed more than once (kept the first entry)")
            continue
        seen.add(sample.path)
        unique.append(sample)
    return unique


def _inspect(path: Path) -> tuple[str | None, str | None]:
    """Return (problem, mode): problem is None when the image decodes completely."""
    if not path.is_file():
        return "missing file", None
    if path.stat().st_size == 0:
        return "empty file (0 bytes)", None
    try:
        with Image.open(path) as img:
            img.load()
            return None, img.mode
    # Decoders raise many exception types on bad data; any of them means unusable.
    except Exception as exc:
        return f"unreadable image ({type(exc).__name__}: {' '.join(str(exc).split())})", None


def _skip(report: dict, file: str, reason: str) -> None:
    report["skipped"].append({"file": file, "reason": reason})
    if len(report["skipped"]) <= MAX_WARNINGS:
        print(f"warning: skipping {file}: {reason}", file=sys.stderr)
    elif len(report["skipped"]) == MAX_WARNINGS + 1:
        print(
            f"warning: more files skipped; only the first {MAX_WARNINGS} are printed, the"
            " manifest's report lists every one",
            file=sys.stderr,
        )


def mostly_missing(candidates: Iterable[Sample], root: Path) -> tuple[list[str], int] | None:
    """(missing paths, listed paths) when more than half of the listed images are missing."""
    listed = list(dict.fromkeys(s.path for s in candidates))
    missing = [p for p in listed if not (root / p).is_file()]
    if listed and len(missing) > MOSTLY_MISSING * len(listed):
        return missing, len(listed)
    return None


def holding_folder(paths: list[str], folders: Iterable[Path], sample: int = 20) -> Path | None:
    """The folder among ``folders`` that holds most of (a sample of) ``paths``, if over half."""
    probe = paths[:sample]

    def hits(folder: Path) -> int:
        return sum((folder / p).is_file() for p in probe)

    scored = [(hits(f), f) for f in folders if f.is_dir()]
    best = max(scored, key=lambda pair: pair[0], default=(0, None))
    return best[1] if probe and 2 * best[0] > len(probe) else None


def subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return []


def _group(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.identity, []).append(sample)
    # Order within an identity must not depend on CSV row or directory listing order.
    return {i: sorted(groups[i], key=lambda s: s.path) for i in sort_identities(groups)}


def _drop_small_identities(
    groups: dict[str, list[Sample]], report: dict, identity_label: Callable[[str], str]
) -> dict[str, list[Sample]]:
    kept = {}
    for identity, samples in groups.items():
        if len(samples) < MIN_IMAGES_PER_IDENTITY:
            report["dropped_identities"].append(
                {
                    "identity": identity_label(identity),
                    "reason": f"{len(samples)} usable image(s); a query/gallery pair needs"
                    f" {MIN_IMAGES_PER_IDENTITY}",
                }
            )
        else:
            kept[identity] = samples
    return kept


def split_identities(
    identities: Iterable[str], rule: str, upstream_threshold: int, source: str
) -> tuple[list[str], list[str]]:
    """Split identities into (train, test) by the chosen rule; see module docstring."""
    ordered = sort_identities(identities)
    if rule == "half":
        n_train = math.ceil(len(ordered) / 2)
        train, test = ordered[:n_train], ordered[n_train:]
    else:
        not_numeric = [i for i in ordered if not i.isdigit()]
        if not_numeric:
            raise DataError(
                f"{source}: identity_split 'upstream' needs numeric ids; got {not_numeric[0]!r}"
                " (use 'half')"
            )
        train = [i for i in ordered if int(i) <= upstream_threshold]
        test = [i for i in ordered if int(i) > upstream_threshold]
    for part, ids in (("train", train), ("test", test)):
        if not ids:
            raise DataError(
                f"{source}: identity_split {rule!r} leaves no {part} identities"
                f" ({len(ordered)} usable identities{_threshold_note(rule, upstream_threshold)})"
            )
    return train, test


def _threshold_note(rule: str, threshold: int) -> str:
    return f", train = id <= {threshold}" if rule == "upstream" else ""


def query_gallery_split(groups: dict[str, list[Sample]], rng: np.random.Generator) -> Split:
    """One random gallery image per identity; all its other images are queries."""
    query, gallery = [], []
    for samples in groups.values():
        pick = int(rng.integers(len(samples)))
        gallery.append(samples[pick])
        query.extend(s for i, s in enumerate(samples) if i != pick)
    return Split(query=query, gallery=gallery)


def query_gallery_splits(
    test_groups: dict[str, list[Sample]], seed: int, num_splits: int
) -> list[Split]:
    return [
        query_gallery_split(test_groups, stream(seed, TEST_SPLIT_STREAM, i))
        for i in range(num_splits)
    ]


def carve_validation(
    train_groups: dict[str, list[Sample]], val_fraction: float, seed: int, source: str
) -> tuple[list[Sample], Split]:
    """Hold out part of the TRAIN identities as a validation query/gallery set."""
    identities = list(train_groups)
    n_val = max(MIN_VAL_IDENTITIES, round(val_fraction * len(identities)))
    if len(identities) - n_val < MIN_TRAIN_IDENTITIES:
        raise DataError(
            f"{source}: val_fraction {val_fraction} holds out {n_val} of {len(identities)} training"
            f" identities, leaving {len(identities) - n_val}; training needs at least"
            f" {MIN_TRAIN_IDENTITIES} (lower val_fraction)"
        )
    chosen = stream(seed, VAL_IDENTITIES_STREAM).choice(len(identities), size=n_val, replace=False)
    val_ids = {identities[i] for i in chosen}
    val_groups = {i: s for i, s in train_groups.items() if i in val_ids}
    train = [s for i, samples in train_groups.items() if i not in val_ids for s in samples]
    return train, query_gallery_split(val_groups, stream(seed, VAL_GALLERY_STREAM))


def validation_fold_count(manifest: Manifest) -> int:
    """Fold 0 (the prepared validation identities) plus one fold per whole group of as many
    other training identities; 1 when the manifest has no validation identities."""
    size = len(_validation_identities(manifest))
    return 1 + len(manifest.train_identities()) // size if size else 1


def validation_fold_view(manifest: Manifest, fold: int, source: str = "manifest") -> Manifest:
    """The manifest with validation fold ``fold`` held out of training.

    Fold 0 is the manifest as prepared. Fold k >= 1 moves the prepared validation identities
    back into training and holds out the k-th group of a seeded permutation of the other
    training identities, each group as large as the prepared validation set, as a query/gallery
    set with one gallery image per identity. The permutation depends only on the seed and those
    identities, and each fold's gallery has its own stream, so fold k is the same however many
    folds are used. Test splits are untouched. The view references the same image files, so it
    shares the decoded image store. A fold that does not exist is a one-line DataError naming
    ``source``.
    """
    if fold == 0:
        return manifest
    if manifest.identity_set != VAL_HELD_OUT:
        raise DataError(
            f"{source}: val_fold {fold} needs validation identities, but identity set"
            f" {manifest.identity_set!r} has none (every training identity trains, as with"
            " select_on: test_split0); valid: val_fold 0"
        )
    prepared_val = _validation_identities(manifest)
    folds = validation_fold_count(manifest)
    if not 0 <= fold < folds:
        raise DataError(
            f"{source}: val_fold {fold} does not exist (valid: 0 to {folds - 1}: 0 is the"
            f" {len(prepared_val)} prepared validation identities, k the k-th group of as many"
            f" of the {len(manifest.train_identities())} other training identities)"
        )
    pool = _group([*manifest.train, *manifest.val.query, *manifest.val.gallery])
    others = [i for i in pool if i not in prepared_val]
    order = stream(manifest.seed, VAL_FOLD_IDENTITIES_STREAM).permutation(len(others))
    size = len(prepared_val)
    fold_ids = {others[k] for k in order[(fold - 1) * size : fold * size]}
    val_groups = {i: samples for i, samples in pool.items() if i in fold_ids}
    return replace(
        manifest,
        train=[s for i, samples in pool.items() if i not in fold_ids for s in samples],
        val=query_gallery_split(val_groups, stream(manifest.seed, VAL_FOLD_GALLERY_STREAM, fold)),
        protocol={**manifest.protocol, "val_fold": fold},
    )


def _validation_identities(manifest: Manifest) -> set[str]:
    # Every validation identity has exactly one gallery image (query_gallery_split).
    return {s.identity for s in manifest.val.gallery}


def build_manifest(
    *,
    dataset: str,
    aspect: str | None,
    root: Path,
    groups: dict[str, list[Sample]],
    seed: int,
    identity_split: str,
    upstream_threshold: int,
    val_fraction: float,
    num_splits: int,
    protocol: dict,
    report: dict,
    source: str,
    identity_set: str = VAL_HELD_OUT,
) -> Manifest:
    """Split checked identity groups into train / val / test splits (see `validate_options`)."""
    if not groups:
        raise DataError(
            f"{source}: no identity has {MIN_IMAGES_PER_IDENTITY} usable images"
            f" ({len(report['dropped_identities'])} identities with fewer were dropped,"
            f" {len(report['skipped'])} image files skipped); a query/gallery pair needs"
            f" {MIN_IMAGES_PER_IDENTITY} images of one identity"
        )
    train_ids, test_ids = split_identities(groups, identity_split, upstream_threshold, source)
    train_groups = {i: groups[i] for i in train_ids}
    if identity_set == UPSTREAM_ALL_TRAIN:
        train, val = [s for samples in train_groups.values() for s in samples], Split([], [])
    else:
        train, val = carve_validation(train_groups, val_fraction, seed, source)
    return Manifest(
        dataset=dataset,
        aspect=aspect,
        root=str(root.resolve()),
        seed=seed,
        protocol={
            "identity_split": identity_split,
            **({"upstream_threshold": upstream_threshold} if identity_split == "upstream" else {}),
            "val_fraction": val_fraction,
            "num_splits": num_splits,
            "gallery": "one seeded random image per identity, the rest are queries",
            **protocol,
        },
        train=train,
        val=val,
        test_splits=query_gallery_splits({i: groups[i] for i in test_ids}, seed, num_splits),
        report=report,
        identity_set=identity_set,
    )


def write_prepared(manifest: Manifest, out: Path, progress: bool) -> Manifest:
    path = save_manifest(manifest, Path(out) / "manifest.json")
    if progress:
        print(f"{manifest.summary()}\nwrote {path}", file=sys.stderr)
    return manifest
