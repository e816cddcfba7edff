"""Prepare the HD (PolyU contactless hand dorsal) dataset as a manifest.

Layout: ``<src>/Original Images/1-501/*.jpg`` (the subjects; identity = file name
up to the first ``_``) and ``<src>/Original Images/502-712/*.jpg`` (distractor
subjects). Nothing is copied: paths are relative to ``<src>/Original Images``.

Policies (besides the shared ones in `_splits`):

* Distractors are added to EVERY gallery of every test split, never to train,
  validation or queries. Their identities are prefixed ``distractor_`` so they can
  never match a query, whatever their number (upstream's +1000 id offset broke the
  index alignment: B18). They need no minimum image count.
* ``identity_split="upstream"`` is ``int(id) <= 447`` as in the upstream code. This
  is ambiguous upstream: the script's comment and its dataset summary describe a
  251/251 half split instead (B18). ``"half"`` (the default) gives that half split.
* Image files are those with a .jpg/.jpeg/.png/.bmp suffix (any case); other
  files in the folders are ignored.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ._splits import (
    build_manifest,
    checked_groups,
    checked_samples,
    new_report,
    validate_options,
    write_prepared,
)
from .errors import DataError
from .manifest import Manifest, Sample

IMAGES_DIR = "Original Images"
SUBJECTS_DIR = "1-501"
DISTRACTORS_DIR = "502-712"
UPSTREAM_THRESHOLD = 447
DISTRACTOR_PREFIX = "distractor_"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
LAYOUT = (
    f"expected the HD layout '{IMAGES_DIR}/{SUBJECTS_DIR}/' and '{IMAGES_DIR}/{DISTRACTORS_DIR}/'"
)


def prepare_hd(
    src,
    out,
    seed: int = 0,
    identity_split: str = "half",
    val_fraction: float = 0.2,
    num_splits: int = 10,
    progress: bool = True,
) -> Manifest:
    validate_options(identity_split, val_fraction, num_splits, seed)
    root = Path(src) / IMAGES_DIR
    report = new_report()
    subjects = _folder_samples(root, SUBJECTS_DIR)
    distractors = _folder_samples(root, DISTRACTORS_DIR)
    if progress:
        print(
            f"checking {len(subjects)} subject and {len(distractors)} distractor images in {root}",
            file=sys.stderr,
        )
    manifest = build_manifest(
        dataset="hd",
        aspect=None,
        root=root,
        seed=seed,
        identity_split=identity_split,
        groups=checked_groups(subjects, root, report),
        upstream_threshold=UPSTREAM_THRESHOLD,
        val_fraction=val_fraction,
        num_splits=num_splits,
        report=report,
        source=str(root),
        protocol={
            "source_dir": str(root.resolve()),
            "distractors": f"every image in {DISTRACTORS_DIR}/ is in every test gallery,"
            f" identity prefixed '{DISTRACTOR_PREFIX}'",
        },
    )
    # Never queried, so distractors need no minimum image count.
    distractor_gallery = [
        Sample(s.path, DISTRACTOR_PREFIX + s.identity)
        for s in checked_samples(distractors, root, report)
    ]
    for split in manifest.test_splits:
        split.gallery += distractor_gallery
    return write_prepared(manifest, Path(out), progress)


def _folder_samples(root: Path, folder: str) -> list[Sample]:
    directory = root / folder
    if not directory.is_dir():
        raise DataError(f"{directory} not found: {LAYOUT}")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [Sample(f"{folder}/{p.name}", p.stem.split("_", 1)[0].strip()) for p in files]
