"""Prepare the 11k Hands dataset (or synthetic data in its layout) as a manifest.

Layout: ``<src>/HandInfo.csv`` and the images in ``<src>/Hands/``. Nothing is copied:
the manifest lists paths relative to ``<src>/Hands``.

Policies (besides the shared ones in `_splits`):

* Rows are kept when ``int(accessories) == 0`` and ``aspectOfHand`` is the chosen
  aspect, as upstream. Ids are stripped of whitespace (upstream has ``'1200000 '``).
* Every CSV row is validated: ``imageName`` must stay inside ``Hands/`` (absolute
  paths and ``..`` are refused with a DataError naming the line), ``accessories``
  must be an integer, ``id`` non-empty.
* ``identity_split="upstream"`` uses upstream's per-aspect thresholds on ``int(id)``.
* When more than half of the listed images are not in ``Hands/``, preparation stops
  with one line naming where they were looked for and, when they are one folder
  away (``Hands/Hands/``, or ``<src>`` itself), where they are and the ``--src`` or
  move that fixes it.
* ``cross_aspect_gallery=True`` adds ``gallery_all`` to every test split (MBA-Net
  protocol, upstream ``gallery{i}_all``): this aspect's gallery plus the galleries
  the same seed gives the other three aspects, whose identities are prefixed with
  their aspect (``dorsal_l_0000123``) so the same person in another aspect counts
  as a different identity. Those aspects' images are checked the same way.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from ..names import ASPECT_PHRASES, ASPECTS
from ._splits import (
    build_manifest,
    checked_groups,
    holding_folder,
    mostly_missing,
    new_report,
    query_gallery_splits,
    split_identities,
    subfolders,
    validate_options,
    write_prepared,
)
from .errors import DataError
from .manifest import VAL_HELD_OUT, Manifest, Sample

CSV_NAME = "HandInfo.csv"
IMAGES_DIR = "Hands"
UPSTREAM_THRESHOLDS = {"dorsal_r": 1050, "dorsal_l": 1037, "palmar_r": 1051, "palmar_l": 1042}
REQUIRED_COLUMNS = ("id", "accessories", "aspectOfHand", "imageName")
LAYOUT = f"expected the 11k Hands layout ({CSV_NAME} and {IMAGES_DIR}/)"


@dataclass
class _Row:
    identity: str
    accessories: int
    aspect_of_hand: str
    image: str  # validated relative path inside Hands/


def prepare_11k(
    src,
    aspect: str,
    out,
    seed: int = 0,
    identity_split: str = "half",
    val_fraction: float | None = None,
    num_splits: int = 10,
    cross_aspect_gallery: bool = False,
    progress: bool = True,
    identity_set: str = VAL_HELD_OUT,
) -> Manifest:
    """Prepare ``<src>`` (HandInfo.csv, Hands/) for one aspect; write ``<out>/manifest.json``.

    ``val_fraction`` (default 0.2) of the training identities are held out for validation;
    ``identity_set="upstream_all_train"`` trains on all of them instead, with no validation set
    (upstream's identity set, for as-run reproductions).
    """
    src = Path(src)
    if aspect not in ASPECTS:
        raise DataError(f"unknown aspect {aspect!r}: valid aspects are {', '.join(ASPECTS)}")
    val_fraction = validate_options(identity_split, val_fraction, num_splits, seed, identity_set)
    csv_path = src / CSV_NAME
    rows = _read_rows(csv_path, src)
    root = src / IMAGES_DIR
    if not root.is_dir():
        raise DataError(f"{IMAGES_DIR}/ not found in {src}: {LAYOUT}")

    report = new_report()
    report["rows"] = _row_counts(rows, aspect)
    if report["rows"]["kept"] == 0:
        raise DataError(
            f"{csv_path}: no row has aspectOfHand '{ASPECT_PHRASES[aspect]}' and accessories 0"
            f" ({len(rows)} rows read), so aspect {aspect} has no identities to prepare"
        )
    _refuse_mostly_missing(_candidates(rows, aspect), root, src, csv_path, aspect)
    groups = _checked_aspect(rows, aspect, root, report, progress, label=str)
    manifest = build_manifest(
        dataset="11k",
        aspect=aspect,
        root=root,
        groups=groups,
        seed=seed,
        identity_split=identity_split,
        upstream_threshold=UPSTREAM_THRESHOLDS[aspect],
        val_fraction=val_fraction,
        num_splits=num_splits,
        report=report,
        source=str(csv_path),
        identity_set=identity_set,
        protocol={
            "source_csv": str(csv_path.resolve()),
            "filter": f"accessories == 0 and aspectOfHand == '{ASPECT_PHRASES[aspect]}'",
            "cross_aspect_gallery": cross_aspect_gallery,
        },
    )
    if cross_aspect_gallery:
        _add_cross_aspect_galleries(manifest, rows, root, progress, identity_split, csv_path)
    return write_prepared(manifest, Path(out), progress)


def _read_rows(csv_path: Path, src: Path) -> list[_Row]:
    if not csv_path.is_file():
        deeper = [p / CSV_NAME for p in subfolders(src) if (p / CSV_NAME).is_file()]
        hint = f"; found {deeper[0]}: use --src {deeper[0].parent}" if deeper else ""
        raise DataError(f"{CSV_NAME} not found in {src}: {LAYOUT}{hint}")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise DataError(
                    f"{csv_path}: missing column(s) {', '.join(missing)}; an 11k {CSV_NAME}"
                    f" needs {', '.join(REQUIRED_COLUMNS)}"
                )
            reader.fieldnames = columns
            return [_parse_row(row, csv_path, reader.line_num) for row in reader]
    except UnicodeDecodeError:
        raise DataError(f"{csv_path}: not a UTF-8 text file: {LAYOUT}") from None


def _parse_row(row: dict, csv_path: Path, line: int) -> _Row:
    values = {c: (row.get(c) or "").strip() for c in REQUIRED_COLUMNS}
    if not values["id"]:
        raise DataError(
            f"{csv_path}: line {line}: column 'id' is empty; every row needs an identity"
        )
    try:
        accessories = int(values["accessories"])
    except ValueError:
        raise DataError(
            f"{csv_path}: line {line}: column 'accessories' must be an integer (0 = none);"
            f" got {values['accessories']!r}"
        ) from None
    return _Row(
        values["id"],
        accessories,
        values["aspectOfHand"],
        _inside_images_dir(values["imageName"], csv_path, line),
    )


def _inside_images_dir(name: str, csv_path: Path, line: int) -> str:
    """Return imageName as a relative '/' path, refusing anything that leaves Hands/."""
    # Windows path rules catch both separators, drive letters and rooted paths.
    path = PureWindowsPath(name)
    if not name or path.drive or path.root or ".." in path.parts:
        raise DataError(
            f"{csv_path}: line {line}: column 'imageName' is {name!r}; it must be a relative"
            f" path inside {IMAGES_DIR}/ (no absolute path, no '..')"
        )
    return "/".join(path.parts)


def _row_counts(rows: list[_Row], aspect: str) -> dict:
    this_aspect = [r for r in rows if r.aspect_of_hand == ASPECT_PHRASES[aspect]]
    with_accessories = sum(r.accessories != 0 for r in this_aspect)
    return {
        "total": len(rows),
        "kept": len(this_aspect) - with_accessories,
        "filtered_accessories": with_accessories,
        "filtered_other_aspects": len(rows) - len(this_aspect),
    }


def _candidates(rows: list[_Row], aspect: str) -> list[Sample]:
    return [
        Sample(r.image, r.identity)
        for r in rows
        if r.accessories == 0 and r.aspect_of_hand == ASPECT_PHRASES[aspect]
    ]


def _refuse_mostly_missing(
    candidates: list[Sample], root: Path, src: Path, csv_path: Path, aspect: str
) -> None:
    """One line instead of a warning per image when most listed images are not in Hands/."""
    found = mostly_missing(candidates, root)
    if found is None:
        return
    missing, listed = found
    elsewhere = [p for p in subfolders(src) if p != root]
    folder = holding_folder(missing, [*subfolders(root), src, *elsewhere])
    if folder is None:
        hint = (
            f"; they are not one folder deeper either: --src must hold {CSV_NAME} and"
            f" {IMAGES_DIR}/ with the images directly inside it"
        )
    elif folder.parent == root and folder.name == IMAGES_DIR and (root / CSV_NAME).is_file():
        hint = f"; they are one folder deeper, in {folder}/: use --src {root}"
    elif folder.parent == root:
        hint = f"; they are one folder deeper, in {folder}/: move them up into {root}/"
    elif folder.name == IMAGES_DIR and (folder.parent / CSV_NAME).is_file():
        hint = f"; they are in {folder}/: use --src {folder.parent}"
    else:
        hint = f"; they are in {folder}/: move them into {root}/"
    raise DataError(
        f"{csv_path}: {len(missing)} of the {listed} {aspect} images it lists are missing from"
        f" {root}/ (e.g. {missing[0]}){hint}"
    )


def _checked_aspect(
    rows: list[_Row],
    aspect: str,
    root: Path,
    report: dict,
    progress: bool,
    label: Callable[[str], str],
) -> dict[str, list[Sample]]:
    candidates = _candidates(rows, aspect)
    if progress:
        print(f"checking {len(candidates)} {aspect} images in {root}", file=sys.stderr)
    return checked_groups(candidates, root, report, identity_label=label)


def _add_cross_aspect_galleries(
    manifest: Manifest,
    rows: list[_Row],
    root: Path,
    progress: bool,
    identity_split: str,
    csv_path: Path,
) -> None:
    for split in manifest.test_splits:
        split.gallery_all = list(split.gallery)
    for other in ASPECTS:
        if other == manifest.aspect:
            continue

        def label(identity: str, aspect: str = other) -> str:
            return f"{aspect}_{identity}"

        groups = _checked_aspect(rows, other, root, manifest.report, progress, label)
        _, test_ids = split_identities(
            groups, identity_split, UPSTREAM_THRESHOLDS[other], f"{csv_path} ({other})"
        )
        other_splits = query_gallery_splits(
            {i: groups[i] for i in test_ids}, manifest.seed, len(manifest.test_splits)
        )
        for split, other_split in zip(manifest.test_splits, other_splits, strict=True):
            split.gallery_all += [Sample(s.path, label(s.identity)) for s in other_split.gallery]
