"""Prepared-dataset manifests.

A manifest (``manifest.json``) records how a dataset was prepared and which image
belongs to which part (train, validation, test splits) WITHOUT copying any image:
every sample is a path relative to ``Manifest.root`` plus its identity string.

Policies:

* Identities are their string ids (never a folder index), so query and gallery
  are matched by name even when a gallery holds extra (distractor) identities
  (upstream bug B18).
* The splits are generated once from a seed and stored, so every run and trial
  evaluates on exactly the same file lists (B14).
* The file is written atomically (temporary file + ``os.replace``), so a reader
  never sees a half-written manifest.
* ``identity_set`` names what the training identities are:

  - ``"val_held_out"`` (the default): some training identities are held out as the
    validation query/gallery set, on which models are selected (B11 fixed).
  - ``"upstream_all_train"``: every training identity trains and the validation set
    is empty, as upstream ran (it selected on test split 1 instead: the as-run switch
    ``select_on: test_split0``, B11). `upstream_training_view` derives it from a
    ``val_held_out`` manifest.

  A manifest written before the key existed reads as ``val_held_out`` when it has
  validation samples and ``upstream_all_train`` when it has none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import DataError

MANIFEST_NAME = "manifest.json"
FORMAT = "tune_clipfh.manifest"
VERSION = 1
VAL_HELD_OUT = "val_held_out"
UPSTREAM_ALL_TRAIN = "upstream_all_train"
IDENTITY_SETS = (VAL_HELD_OUT, UPSTREAM_ALL_TRAIN)


@dataclass
class Sample:
    path: str  # relative to Manifest.root, '/'-separated
    identity: str


@dataclass
class Split:
    query: list[Sample]
    gallery: list[Sample]
    # 11k cross-aspect protocol only: this split's gallery pooled with the other
    # aspects' galleries, their identities made distinct.
    gallery_all: list[Sample] | None = None


@dataclass
class Manifest:
    dataset: str  # "11k" | "hd" (synthetic data is "11k")
    aspect: str | None  # dorsal_r, dorsal_l, palmar_r, palmar_l; None for hd
    root: str  # absolute path of the image root
    seed: int
    protocol: dict
    train: list[Sample]
    val: Split  # held-out TRAIN identities (never test identities: B11)
    test_splits: list[Split]
    report: dict = field(default_factory=dict)
    identity_set: str = VAL_HELD_OUT  # one of IDENTITY_SETS; see the module docstring

    def train_identities(self) -> list[str]:
        return sort_identities({s.identity for s in self.train})

    def all_samples(self) -> list[Sample]:
        """Every sample referenced anywhere, once per file, in first-seen order."""
        seen: dict[str, Sample] = {}
        for sample in self._referenced():
            seen.setdefault(sample.path, sample)
        return list(seen.values())

    def abspath(self, sample: Sample) -> Path:
        return Path(self.root) / sample.path

    def summary(self) -> str:
        aspect = f", aspect {self.aspect}" if self.aspect else ""
        lines = [
            f"dataset {self.dataset}{aspect}, seed {self.seed}, root {self.root}",
            f"train: {_count(self.train)}",
            f"val:   query {_count(self.val.query)}, gallery {_count(self.val.gallery)}"
            if self.identity_set == VAL_HELD_OUT
            else f"val:   none (identity set {self.identity_set}: every training identity trains)",
        ]
        if self.test_splits:
            first = self.test_splits[0]
            lines.append(
                f"test:  {len(self.test_splits)} splits; split 0: query {_count(first.query)},"
                f" gallery {_count(first.gallery)}"
            )
            if first.gallery_all is not None:
                lines.append(f"       cross-aspect gallery {_count(first.gallery_all)}")
        lines.append(_report_line(self.report))
        return "\n".join(lines)

    def _referenced(self) -> Iterable[Sample]:
        yield from self.train
        for split in (self.val, *self.test_splits):
            yield from split.query
            yield from split.gallery
            yield from split.gallery_all or ()


def upstream_training_view(manifest: Manifest) -> Manifest:
    """The manifest with its validation identities moved back into train (upstream's set).

    Upstream trained on every training identity (72 for 11k dorsal_r) and selected models on
    test split 1 (B11). The result has ``identity_set`` ``"upstream_all_train"``, an empty
    validation set and the same test splits; it equals what preparing with
    ``identity_set="upstream_all_train"`` gives. It references the same image files, so it
    shares the decoded image store. A manifest already of that set is returned unchanged.
    """
    if manifest.identity_set == UPSTREAM_ALL_TRAIN:
        return manifest
    groups: dict[str, list[Sample]] = {}
    for sample in (*manifest.train, *manifest.val.query, *manifest.val.gallery):
        groups.setdefault(sample.identity, []).append(sample)
    train = [s for i in sort_identities(groups) for s in sorted(groups[i], key=lambda s: s.path)]
    return replace(
        manifest,
        train=train,
        val=Split(query=[], gallery=[]),
        protocol={**manifest.protocol, "val_fraction": 0.0},
        identity_set=UPSTREAM_ALL_TRAIN,
    )


def sort_identities(identities: Iterable[str]) -> list[str]:
    """Sort ids numerically when all are digit strings, else as text."""
    unique = set(identities)
    if all(i.isdigit() for i in unique):
        return sorted(unique, key=lambda i: (int(i), i))
    return sorted(unique)


def save_manifest(manifest: Manifest, path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest_to_dict(manifest), indent=1)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Load a manifest from its file or from the folder that holds ``manifest.json``."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"manifest not found: {path}: expected a {MANIFEST_NAME} written by the prepare step"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path}: not a valid manifest: malformed JSON ({_one_line(exc)})"
        ) from None
    return manifest_from_dict(data, source=path)


def manifest_to_dict(manifest: Manifest) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "dataset": manifest.dataset,
        "aspect": manifest.aspect,
        "root": manifest.root,
        "seed": manifest.seed,
        "protocol": manifest.protocol,
        "train": _samples_out(manifest.train),
        "val": _split_out(manifest.val),
        "test_splits": [_split_out(s) for s in manifest.test_splits],
        "report": manifest.report,
        "identity_set": manifest.identity_set,
    }


def manifest_from_dict(data: object, source: Path) -> Manifest:
    reader = _Reader(source)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(
            f'{source}: not a manifest: expected a JSON object with "format": "{FORMAT}"'
        )
    if data.get("version") != VERSION:
        raise DataError(
            f"{source}: key 'version' is {data.get('version')!r}; this code reads version {VERSION}"
        )
    manifest = Manifest(
        dataset=reader.get(data, "dataset", str),
        aspect=reader.get(data, "aspect", (str, type(None))),
        root=reader.get(data, "root", str),
        seed=reader.get(data, "seed", int),
        protocol=reader.get(data, "protocol", dict),
        train=reader.samples(data, "train"),
        val=reader.split(reader.get(data, "val", dict), "val"),
        test_splits=[
            reader.split(split, f"test_splits[{i}]")
            for i, split in enumerate(reader.get(data, "test_splits", list))
        ],
        report=reader.get(data, "report", dict),
    )
    has_val = bool(manifest.val.query or manifest.val.gallery)
    if "identity_set" not in data:  # written before the key existed
        manifest.identity_set = VAL_HELD_OUT if has_val else UPSTREAM_ALL_TRAIN
        return manifest
    manifest.identity_set = reader.get(data, "identity_set", str)
    if manifest.identity_set not in IDENTITY_SETS:
        raise DataError(
            f"{source}: not a valid manifest: key 'identity_set' is {manifest.identity_set!r}"
            f" (valid: {', '.join(IDENTITY_SETS)})"
        )
    if has_val != (manifest.identity_set == VAL_HELD_OUT):
        raise DataError(
            f"{source}: not a valid manifest: identity_set {manifest.identity_set!r} but the"
            f" validation set is {'not ' if has_val else ''}empty"
        )
    return manifest


class _Reader:
    """Typed access to manifest JSON that fails with a one-line DataError."""

    def __init__(self, source: Path):
        self.source = source

    def get(self, obj: dict, key: str, kind: type | tuple[type, ...], where: str = ""):
        name = f"{where}.{key}" if where else key
        if key not in obj:
            raise DataError(f"{self.source}: not a valid manifest: missing key '{name}'")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DataError(
                f"{self.source}: not a valid manifest: key '{name}' has the wrong type"
                f" ({type(value).__name__})"
            )
        return value

    def samples(self, obj: dict, key: str, where: str = "") -> list[Sample]:
        name = f"{where}.{key}" if where else key
        out = []
        for i, entry in enumerate(self.get(obj, key, list, where)):
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("path"), str)
                and isinstance(entry.get("identity"), str)
            ):
                raise DataError(
                    f"{self.source}: not a valid manifest: '{name}[{i}]' must be an object"
                    " with string keys 'path' and 'identity'"
                )
            out.append(Sample(entry["path"], entry["identity"]))
        return out

    def split(self, obj: dict, where: str) -> Split:
        if not isinstance(obj, dict):
            raise DataError(f"{self.source}: not a valid manifest: '{where}' must be an object")
        gallery_all = (
            self.samples(obj, "gallery_all", where) if obj.get("gallery_all") is not None else None
        )
        return Split(
            query=self.samples(obj, "query", where),
            gallery=self.samples(obj, "gallery", where),
            gallery_all=gallery_all,
        )


def _samples_out(samples: list[Sample]) -> list[dict]:
    return [{"path": s.path, "identity": s.identity} for s in samples]


def _split_out(split: Split) -> dict:
    out = {"query": _samples_out(split.query), "gallery": _samples_out(split.gallery)}
    if split.gallery_all is not None:
        out["gallery_all"] = _samples_out(split.gallery_all)
    return out


def _count(samples: list[Sample]) -> str:
    return f"{len({s.identity for s in samples})} ids / {len(samples)} images"


def _report_line(report: dict) -> str:
    rows = report.get("rows", {})
    parts = [f"kept {rows['kept']} of {rows['total']} csv rows"] if rows else []
    parts += [
        f"skipped {len(report.get('skipped', []))} files",
        f"converted {len(report.get('converted', []))} to RGB",
        f"dropped {len(report.get('dropped_identities', []))} identities",
    ]
    return "report: " + ", ".join(parts)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
