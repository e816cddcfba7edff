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
* Unpacking mistakes get one line: a layout folder that is missing or holds no
  images, while a folder of that name with images sits nearby (``1-501/1-501/``,
  ``<src>/HD/Original Images/``, or ``--src`` pointing at ``Original Images``
  itself), is refused naming where the images are and the ``--src`` or move that
  fixes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ._splits import (
    build_manifest,
    checked_groups,
    checked_samples,
    new_report,
    subfolders,
    validate_options,
    write_prepared,
)
from .errors import DataError
from .manifest import VAL_HELD_OUT, Manifest, Sample

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
    val_fraction: float | None = None,
    num_splits: int = 10,
    progress: bool = True,
    identity_set: str = VAL_HELD_OUT,
) -> Manifest:
    """Prepare ``<src>/Original Images``; write ``<out>/manifest.json``.

    ``val_fraction`` and ``identity_set`` as for `prepare_11k`.
    """
    val_fraction = validate_options(identity_split, val_fraction, num_splits, seed, identity_set)
    src = Path(src)
    root = src / IMAGES_DIR
    report = new_report()
    for folder in (SUBJECTS_DIR, DISTRACTORS_DIR):
        if not (root / folder).is_dir():
            raise DataError(f"{root / folder} not found: {LAYOUT}{_nearby(src, folder)}")
    subjects = _folder_samples(src, SUBJECTS_DIR)
    distractors = _folder_samples(src, DISTRACTORS_DIR)
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
        identity_set=identity_set,
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


def _folder_samples(src: Path, folder: str) -> list[Sample]:
    directory = src / IMAGES_DIR / folder
    files = _images(directory)
    if not files:
        hint = _nearby(src, folder)
        if hint or folder == SUBJECTS_DIR:
            raise DataError(f"{directory} holds no images: {LAYOUT}{hint}")
    return [Sample(f"{folder}/{p.name}", p.stem.split("_", 1)[0].strip()) for p in files]


def _images(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError:
        return []


def _nearby(src: Path, folder: str) -> str:
    """'; found ...: <fix>' for a folder named ``folder`` holding images near the layout."""
    expected = src / IMAGES_DIR / folder
    levels = [[src]]
    for _ in range(3):  # src, its subfolders, theirs, and one more level
        levels.append([sub for parent in levels[-1] for sub in subfolders(parent)])
    found = next(
        (
            p
            for level in levels
            for p in level
            if p.name == folder and p != expected and p.is_dir() and _images(p)
        ),
        None,
    )
    if found is None:
        return ""
    if found.parent.name == folder:  # e.g. 1-501/1-501/
        return f"; the images are one folder deeper, in {found}/: move them up into {found.parent}/"
    if found.parent.name == IMAGES_DIR:
        return f"; found {found}/: use --src {found.parent.parent}"
    return f"; found {found}/: move it to {expected}/"
