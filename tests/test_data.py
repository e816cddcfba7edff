"""Tests of the data layer: synthetic data, preparation (11k, HD), manifests, store, samplers."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tune_clipfh.cli import main
from tune_clipfh.config import ConfigError, build_config
from tune_clipfh.data import _splits
from tune_clipfh.data import store as store_module
from tune_clipfh.data.errors import DataError
from tune_clipfh.data.hands11k import prepare_11k
from tune_clipfh.data.hd import prepare_hd
from tune_clipfh.data.manifest import Sample, load_manifest, save_manifest, upstream_training_view
from tune_clipfh.data.prepared import check_prepared_for, identity_set_for, load_prepared
from tune_clipfh.data.sampler import PKSampler, RandomBatchSampler
from tune_clipfh.data.store import CLIP_MEAN, CLIP_STD, Augment, ImageStore, augment, normalize
from tune_clipfh.data.synth import synthesize
from tune_clipfh.errors import UserError
from tune_clipfh.names import ASPECTS

from handinfo_csv import COLUMNS, dorsal_right_files, read_rows, write_rows

SMALL = {"identities": 12, "images_per_identity": 4, "image_size": (64, 48), "progress": False}


def ids(samples) -> set[str]:
    return {s.identity for s in samples}


def paths(samples) -> set[str]:
    return {s.path for s in samples}


@pytest.fixture(scope="module")
def synth_src(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("synth"), seed=0, **SMALL)


@pytest.fixture(scope="module")
def manifest(synth_src, tmp_path_factory):
    return prepare_11k(
        synth_src, "dorsal_r", tmp_path_factory.mktemp("prepared"), seed=0, progress=False
    )


@pytest.fixture
def own_src(tmp_path) -> Path:
    """A small synthetic dataset this test may damage (8 ids: 2 val, 2 train, 4 test)."""
    return synthesize(
        tmp_path / "src", identities=8, images_per_identity=4, image_size=(64, 48), progress=False
    )


# --- synthetic data -------------------------------------------------------------------------


def test_synthesize_is_byte_identical_for_a_seed_and_differs_across_seeds(tmp_path):
    def files(seed, name):
        out = synthesize(
            tmp_path / name,
            identities=3,
            images_per_identity=2,
            seed=seed,
            image_size=(48, 36),
            progress=False,
        )
        return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    first, again, other = files(0, "a"), files(0, "b"), files(1, "c")
    assert first == again
    assert first.keys() == other.keys()
    assert any(first[name] != other[name] for name in first if name.suffix == ".jpg")


def test_synthesize_writes_the_11k_layout(synth_src):
    with (synth_src / "HandInfo.csv").open(newline="") as handle:
        assert next(csv.reader(handle)) == COLUMNS
    rows = read_rows(synth_src)
    assert len(rows) == 12 * 4 * 4
    assert {r["aspectOfHand"] for r in rows} == {
        "dorsal right",
        "dorsal left",
        "palmar right",
        "palmar left",
    }
    assert all(len(r["id"]) == 7 and r["id"].isdigit() for r in rows)
    assert len({r["id"] for r in rows}) == 12
    accessories = sum(r["accessories"] == "1" for r in rows)
    assert 0 < accessories < len(rows) * 0.25
    image = Image.open(synth_src / "Hands" / rows[0]["imageName"])
    assert image.size == (64, 48) and image.mode == "RGB"


# --- 11k preparation ------------------------------------------------------------------------


def test_prepare_parts_are_identity_disjoint_and_val_is_train_side(manifest):
    train, val, test = (
        ids(manifest.train),
        ids(manifest.val.gallery),
        ids(manifest.test_splits[0].gallery),
    )
    assert train and val and test
    assert not (train & val or train & test or val & test)
    assert ids(manifest.val.query) == val
    # "half" split: val identities come from the first (train) half of the sorted ids.
    assert max(int(i) for i in train | val) < min(int(i) for i in test)
    assert len(train | val) == 6  # ceil(12 / 2)
    assert manifest.train_identities() == sorted(train)


def test_every_split_has_one_gallery_image_per_identity(manifest):
    assert len(manifest.test_splits) == 10
    for split in [manifest.val, *manifest.test_splits]:
        assert set(Counter(s.identity for s in split.gallery).values()) == {1}
        assert ids(split.query) == ids(split.gallery)
        assert not paths(split.query) & paths(split.gallery)
    all_test = [paths(s.query) | paths(s.gallery) for s in manifest.test_splits]
    assert all(p == all_test[0] for p in all_test)


def test_splits_are_reproducible_per_seed(synth_src, manifest, tmp_path):
    again = prepare_11k(synth_src, "dorsal_r", tmp_path / "a", seed=0, progress=False)
    other = prepare_11k(synth_src, "dorsal_r", tmp_path / "b", seed=1, progress=False)
    assert again.test_splits == manifest.test_splits and again.val == manifest.val
    assert other.test_splits != manifest.test_splits
    galleries = [paths(s.gallery) for s in manifest.test_splits]
    assert len({frozenset(g) for g in galleries}) > 1  # the 10 splits are not all the same


def test_accessories_and_other_aspects_are_filtered(synth_src, manifest):
    expected = {name for names in dorsal_right_files(synth_src).values() for name in names}
    assert paths(manifest.all_samples()) == expected
    rows = manifest.report["rows"]
    assert rows["total"] == 192 and rows["kept"] == len(expected)
    assert rows["filtered_accessories"] > 0
    assert manifest.report["skipped"] == [] and manifest.report["dropped_identities"] == []


def test_upstream_identity_split_uses_the_hard_coded_threshold(synth_src, tmp_path):
    manifest = prepare_11k(
        synth_src, "dorsal_r", tmp_path, identity_split="upstream", progress=False
    )
    train_side = ids(manifest.train) | ids(manifest.val.gallery)
    assert train_side and all(int(i) <= 1050 for i in train_side)
    assert all(int(i) > 1050 for i in ids(manifest.test_splits[0].gallery))
    assert manifest.protocol["upstream_threshold"] == 1050


def test_cross_aspect_gallery_pools_the_other_aspects_under_distinct_ids(synth_src, tmp_path):
    manifest = prepare_11k(
        synth_src, "palmar_l", tmp_path, cross_aspect_gallery=True, progress=False
    )
    for split in manifest.test_splits:
        native = ids(split.gallery)
        others = ids(split.gallery_all) - native
        assert paths(split.gallery) <= paths(split.gallery_all)
        assert {i.split("_0")[0] for i in others} == {"dorsal_r", "dorsal_l", "palmar_r"}
        assert len(split.gallery_all) == len(ids(split.gallery_all))
    assert load_manifest(tmp_path) == manifest


def test_manifest_round_trips_and_bad_files_give_one_line_errors(manifest, tmp_path):
    save_manifest(manifest, tmp_path / "manifest.json")
    assert load_manifest(tmp_path) == manifest
    assert load_manifest(tmp_path / "manifest.json") == manifest
    with pytest.raises(DataError, match="manifest not found"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="malformed JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "tune_clipfh.manifest", "version": 1}')
    with pytest.raises(DataError, match="missing key 'dataset'") as error:
        load_manifest(tmp_path)
    assert "\n" not in str(error.value)


def test_summary_counts_each_part(manifest):
    summary = manifest.summary()
    assert "dorsal_r" in summary and "10 splits" in summary
    assert f"train: {len(ids(manifest.train))} ids / {len(manifest.train)} images" in summary


def test_missing_handinfo_csv_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"HandInfo.csv not found in .*11k Hands layout"):
        prepare_11k(tmp_path, "dorsal_r", tmp_path / "out", progress=False)


def test_missing_column_names_the_column_and_the_file(own_src, tmp_path):
    write_rows(own_src, read_rows(own_src), columns=[c for c in COLUMNS if c != "aspectOfHand"])
    with pytest.raises(DataError) as error:
        prepare_11k(own_src, "dorsal_r", tmp_path / "out", progress=False)
    assert "HandInfo.csv" in str(error.value) and "aspectOfHand" in str(error.value)


@pytest.mark.parametrize(
    "image_name", ["../secret.jpg", "/etc/passwd", "Hands\\..\\x.jpg", "C:\\x.jpg"]
)
def test_image_names_leaving_the_dataset_are_refused(own_src, tmp_path, image_name):
    rows = read_rows(own_src)
    rows[3]["imageName"] = image_name
    write_rows(own_src, rows)
    with pytest.raises(DataError, match=r"line 5: column 'imageName'"):
        prepare_11k(own_src, "dorsal_r", tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("options", "valid"),
    [
        ({"aspect": "dorsal"}, "dorsal_r, dorsal_l, palmar_r, palmar_l"),
        ({"identity_split": "random"}, "half, upstream"),
        ({"val_fraction": 1.5}, r"\(0, 1\)"),
        ({"identity_set": "everything"}, "val_held_out, upstream_all_train"),
    ],
)
def test_invalid_options_list_the_valid_values(synth_src, tmp_path, options, valid):
    arguments = {"aspect": "dorsal_r", **options}
    with pytest.raises(DataError, match=valid):
        prepare_11k(synth_src, out=tmp_path, progress=False, **arguments)


def test_ids_are_stripped_of_whitespace(own_src, tmp_path):
    rows = read_rows(own_src)
    first = rows[0]["id"]
    for row in rows:
        if row["id"] == first:
            row["id"] = f" {first}  "
    write_rows(own_src, rows)
    manifest = prepare_11k(own_src, "dorsal_r", tmp_path / "out", progress=False)
    assert first in ids(manifest.all_samples())


def test_corrupt_and_missing_files_are_skipped_and_reported(own_src, tmp_path, capsys):
    files = dorsal_right_files(own_src)
    hands = own_src / "Hands"
    # Damage identities with 3+ images, so none of them drops below 2.
    big_groups = [names for names in files.values() if len(names) >= 3]
    empty, truncated, text, missing = (names[-1] for names in big_groups[:4])
    (hands / empty).write_bytes(b"")
    data = (hands / truncated).read_bytes()
    (hands / truncated).write_bytes(data[: len(data) // 2])
    (hands / text).write_text("this is not a picture\n")
    (hands / missing).unlink()

    manifest = prepare_11k(own_src, "dorsal_r", tmp_path / "out", progress=False)
    reasons = {entry["file"]: entry["reason"] for entry in manifest.report["skipped"]}
    assert set(reasons) == {empty, truncated, text, missing}
    assert "empty" in reasons[empty] and "missing" in reasons[missing]
    assert "unreadable" in reasons[truncated] and "unreadable" in reasons[text]
    assert not paths(manifest.all_samples()) & set(reasons)
    warnings = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")
    ]
    assert len(warnings) == 4


def test_other_image_modes_are_accepted_and_converted_to_rgb(own_src, tmp_path):
    names = [name for group in dorsal_right_files(own_src).values() for name in group]
    hands = own_src / "Hands"
    Image.new("L", (64, 48), 90).save(hands / names[0], format="JPEG")
    Image.new("RGBA", (64, 48), (10, 200, 30, 128)).save(hands / names[1], format="PNG")
    Image.new("CMYK", (64, 48), (0, 0, 0, 0)).save(hands / names[2], format="JPEG")
    sixteen_bit = Image.fromarray(np.full((48, 64), 128 * 257, dtype=np.uint16))
    sixteen_bit.save(hands / names[3], format="PNG")  # a PNG named .jpg
    Image.new("P", (64, 48), 3).save(hands / names[4], format="PNG")

    manifest = prepare_11k(own_src, "dorsal_r", tmp_path / "out", progress=False)
    converted = {entry["file"] for entry in manifest.report["converted"]}
    assert converted == set(names[:5])
    assert manifest.report["skipped"] == []

    store = ImageStore.build(manifest, 16, tmp_path / "cache", progress=False)
    by_name = {s.path: s for s in manifest.all_samples()}
    pixels = store.batch(store.rows([by_name[n] for n in names[:5]]))
    assert pixels.shape == (5, 3, 16, 16)
    assert abs(int(pixels[0].float().mean()) - 90) <= 2  # grey stays grey
    assert pixels[3].unique().tolist() == [128]  # 16-bit rescaled, not clipped to white


def test_identity_with_a_single_image_is_dropped(own_src, tmp_path):
    files = dorsal_right_files(own_src)
    lonely = next(iter(files))
    rows = [
        r
        for r in read_rows(own_src)
        if not (
            r["id"] == lonely
            and r["aspectOfHand"] == "dorsal right"
            and r["imageName"] != files[lonely][0]
        )
    ]
    write_rows(own_src, rows)
    manifest = prepare_11k(own_src, "dorsal_r", tmp_path / "out", progress=False)
    assert lonely not in ids(manifest.all_samples())
    [dropped] = manifest.report["dropped_identities"]
    assert dropped["identity"] == lonely and "1 usable image" in dropped["reason"]


def test_too_few_identities_is_a_data_error(own_src, tmp_path):
    with pytest.raises(DataError, match="leaving 1; training needs at least 2"):
        prepare_11k(own_src, "dorsal_r", tmp_path / "out", val_fraction=0.8, progress=False)


# --- validation identities and upstream's identity set --------------------------------------


@pytest.mark.parametrize("val_fraction", [0, 0.0, -0.1, 1])
def test_val_fraction_outside_open_unit_interval_is_refused(synth_src, tmp_path, val_fraction):
    with pytest.raises(_splits.ValFractionError) as error:
        prepare_11k(synth_src, "dorsal_r", tmp_path, val_fraction=val_fraction, progress=False)
    message = str(error.value)
    assert isinstance(error.value, UserError) and "\n" not in message
    assert message.startswith("val_fraction (--val-fraction) must be in (0, 1)")
    assert "model selection needs validation identities" in message
    assert "select_on: test_split0" in message and "upstream_all_train" in message
    assert not (tmp_path / "manifest.json").exists()


def test_cli_prepare_refuses_val_fraction_zero_with_one_line(synth_src, tmp_path, capsys):
    argv = ["data", "prepare", "--src", str(synth_src), "--out", str(tmp_path / "p")]
    assert main([*argv, "--val-fraction", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {_splits.ValFractionError(0.0)}"]


@pytest.fixture(scope="module")
def upstream_set(synth_src, tmp_path_factory):
    return prepare_11k(
        synth_src,
        "dorsal_r",
        tmp_path_factory.mktemp("upstream_set"),
        identity_set="upstream_all_train",
        progress=False,
    )


def test_upstream_identity_set_trains_on_every_training_identity(manifest, upstream_set):
    assert manifest.identity_set == "val_held_out"
    assert upstream_set.identity_set == "upstream_all_train"
    assert upstream_set.val.query == [] and upstream_set.val.gallery == []
    assert ids(upstream_set.train) == ids(manifest.train) | ids(manifest.val.gallery)
    assert paths(upstream_set.train) == paths(manifest.train + manifest.val.query) | paths(
        manifest.val.gallery
    )
    assert upstream_set.test_splits == manifest.test_splits  # same seed, same test splits
    assert upstream_set.protocol["val_fraction"] == 0
    assert "identity set upstream_all_train" in upstream_set.summary()


def test_upstream_training_view_equals_preparing_the_upstream_set(manifest, upstream_set):
    view = upstream_training_view(manifest)
    assert view == upstream_set
    assert manifest.identity_set == "val_held_out" and manifest.val.gallery  # not modified
    assert upstream_training_view(upstream_set) is upstream_set


def test_identity_set_round_trips_and_old_manifests_read_by_their_validation_set(
    manifest, upstream_set, tmp_path
):
    for prepared in (manifest, upstream_set):
        save_manifest(prepared, tmp_path / "m.json")
        assert load_manifest(tmp_path / "m.json") == prepared
        data = json.loads((tmp_path / "m.json").read_text())
        del data["identity_set"]  # a manifest written before the key existed
        (tmp_path / "m.json").write_text(json.dumps(data))
        assert load_manifest(tmp_path / "m.json").identity_set == prepared.identity_set
    data["identity_set"] = "val_held_out"  # upstream_set has no validation identities
    (tmp_path / "m.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="identity_set 'val_held_out' but the validation set"):
        load_manifest(tmp_path / "m.json")


def test_upstream_identity_set_refuses_a_validation_fraction(synth_src, tmp_path):
    with pytest.raises(DataError, match="val_fraction .* contradicts identity_set"):
        prepare_11k(
            synth_src,
            "dorsal_r",
            tmp_path,
            val_fraction=0.3,
            identity_set="upstream_all_train",
            progress=False,
        )


def test_load_prepared_views_either_identity_set_over_one_store(manifest, upstream_set, tmp_path):
    cache = str(tmp_path / "cache")
    save_manifest(manifest, tmp_path / "held_out")
    save_manifest(upstream_set, tmp_path / "upstream")
    held_out = load_prepared(tmp_path / "held_out", 16, cache_dir=cache, progress=False)
    every = load_prepared(
        tmp_path / "held_out",
        16,
        cache_dir=cache,
        progress=False,
        identity_set=identity_set_for("test_split0"),
    )
    assert held_out.identity_set == "val_held_out" and len(held_out.val_split.gallery) > 0
    assert every.identity_set == "upstream_all_train" and every.manifest == upstream_set
    assert len(every.val_rows) == 0 and len(every.val_split.query) == 0
    assert every.identities == sorted(ids(upstream_set.train), key=int)
    assert len(every.train_rows) == len(held_out.train_rows) + len(held_out.val_rows)
    assert every.store.directory == held_out.store.directory  # one decoded store
    assert (
        held_out.identities
        == load_prepared(
            tmp_path / "held_out", 16, cache_dir=cache, progress=False, identity_set="val_held_out"
        ).identities
    )
    with pytest.raises(DataError, match="needs held-out training identities") as error:
        load_prepared(
            tmp_path / "upstream",
            16,
            cache_dir=cache,
            progress=False,
            identity_set=identity_set_for("val"),
        )
    assert "\n" not in str(error.value)


# --- validation folds ------------------------------------------------------------------------


def test_validation_fold_zero_is_the_manifest_as_prepared(manifest):
    assert _splits.validation_fold_view(manifest, 0) is manifest


def test_validation_folds_are_disjoint_training_identities_of_the_prepared_size(manifest):
    prepared_val = ids(manifest.val.gallery)
    pool = ids(manifest.train) | prepared_val
    test_ids = {i for split in manifest.test_splits for i in ids(split.query + split.gallery)}
    count = _splits.validation_fold_count(manifest)
    assert count == 1 + len(ids(manifest.train)) // len(prepared_val) == 3  # 4 others, 2 each
    folds = [_splits.validation_fold_view(manifest, k) for k in range(count)]
    val_sets = [ids(fold.val.gallery) for fold in folds]
    for fold, val in zip(folds, val_sets, strict=True):
        assert len(val) == len(prepared_val) and ids(fold.val.query) == val
        assert len(fold.val.gallery) == len(val)  # one gallery image per identity
        assert not val & test_ids and not ids(fold.train) & val
        assert ids(fold.train) | val == pool
        assert paths(fold.train + fold.val.query + fold.val.gallery) == paths(
            manifest.train + manifest.val.query + manifest.val.gallery
        )
        assert fold.test_splits == manifest.test_splits
    assert sum(len(val) for val in val_sets) == len(set().union(*val_sets))  # disjoint
    assert set().union(*val_sets) <= pool
    assert folds[1].protocol["val_fold"] == 1 and "val_fold" not in manifest.protocol
    assert _splits.validation_fold_view(manifest, 2) == folds[2]  # deterministic


@pytest.mark.parametrize("fold", [3, -1])
def test_validation_fold_out_of_range_names_the_fold_and_the_valid_range(manifest, fold):
    with pytest.raises(
        DataError, match=rf"^m\.json: val_fold {fold} does not exist \(valid: 0 to 2"
    ) as error:
        _splits.validation_fold_view(manifest, fold, "m.json")
    assert "\n" not in str(error.value)


def test_validation_fold_of_a_manifest_without_validation_identities_is_refused(upstream_set):
    assert _splits.validation_fold_view(upstream_set, 0) is upstream_set
    with pytest.raises(DataError, match="val_fold 1 needs validation identities") as error:
        _splits.validation_fold_view(upstream_set, 1, "m.json")
    assert "\n" not in str(error.value)


def test_negative_val_fold_is_a_config_error():
    assert build_config({"val_fold": 2}).config.val_fold == 2
    with pytest.raises(ConfigError, match="val_fold") as error:
        build_config({"val_fold": -1})
    assert "\n" not in str(error.value)


def test_load_prepared_val_fold_validates_on_other_identities_over_one_store(manifest, tmp_path):
    cache = str(tmp_path / "cache")
    save_manifest(manifest, tmp_path / "prepared")
    prepared = load_prepared(tmp_path / "prepared", 16, cache_dir=cache, progress=False)
    fold = load_prepared(tmp_path / "prepared", 16, cache_dir=cache, progress=False, val_fold=1)
    assert set(fold.val_ids) and not set(fold.val_ids) & set(prepared.val_ids)
    trained = {fold.identities[label] for label in fold.train_labels}
    assert set(prepared.val_ids) <= trained
    assert fold.store.directory == prepared.store.directory  # one decoded store


def test_cli_prepare_writes_the_identity_set(synth_src, tmp_path, capsys):
    assert main(["data", "prepare", "--src", str(synth_src), "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "manifest.json").read_text())["identity_set"] == "val_held_out"


# --- the configuration's dataset and aspect against the folder's -----------------------------


def test_a_folder_prepared_for_another_aspect_or_dataset_is_refused_before_decoding(
        manifest, tmp_path):
    folder, cache = tmp_path / "prepared", tmp_path / "cache"
    save_manifest(manifest, folder)
    for key, value, prepared in (("aspect", "palmar_r", "dorsal_r"), ("dataset", "hd", "11k")):
        wanted = {"dataset": "11k", "aspect": "dorsal_r", key: value}
        with pytest.raises(DataError) as error:
            load_prepared(folder, 16, cache_dir=str(cache), progress=False, **wanted)
        assert str(error.value) == (
            f"data_dir {folder}: key '{key}': {value}, but the folder was prepared for "
            f"{prepared} (set {key}: {prepared}, or prepare a folder with --{key} {value})")
    assert not cache.exists()  # refused before the store was decoded
    defaults = build_config({}).config  # the embedded default's dataset and aspect
    loaded = load_prepared(folder, 16, cache_dir=str(cache), progress=False,
                           dataset=defaults.dataset, aspect=defaults.aspect)
    assert loaded.manifest == manifest


# --- unpacking mistakes: one line instead of a warning per image ----------------------------


def _move_images(src: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for image in sorted((src / "Hands").glob("*.jpg")):
        image.rename(target / image.name)


def _prepare_error(src: Path, out: Path, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(DataError) as error:
        prepare_11k(src, "dorsal_r", out, progress=False)
    assert "warning:" not in capsys.readouterr().err  # no warning per missing image
    message = str(error.value)
    assert "\n" not in message
    kept = sum(len(names) for names in dorsal_right_files(src).values())
    assert message.startswith(
        f"{src / 'HandInfo.csv'}: {kept} of the {kept} dorsal_r images it lists are missing"
        f" from {src / 'Hands'}/ (e.g. "
    )
    return message


def test_images_one_folder_deeper_are_located(own_src, tmp_path, capsys):
    hands = own_src / "Hands"
    _move_images(own_src, hands / "Hands")  # Hands.zip unpacked inside Hands/
    message = _prepare_error(own_src, tmp_path / "out", capsys)
    assert message.endswith(
        f"; they are one folder deeper, in {hands / 'Hands'}/: move them up into {hands}/"
    )
    shutil.copy(own_src / "HandInfo.csv", hands / "HandInfo.csv")
    message = _prepare_error(own_src, tmp_path / "out", capsys)
    assert message.endswith(
        f"; they are one folder deeper, in {hands / 'Hands'}/: use --src {hands}"
    )
    assert prepare_11k(hands, "dorsal_r", tmp_path / "fixed", progress=False).train


def test_images_beside_hands_are_located(own_src, tmp_path, capsys):
    _move_images(own_src, own_src)  # unpacked into the dataset folder itself
    message = _prepare_error(own_src, tmp_path / "out", capsys)
    assert message.endswith(f"; they are in {own_src}/: move them into {own_src / 'Hands'}/")


def test_images_nowhere_near_say_what_src_must_hold(own_src, tmp_path, capsys):
    for image in (own_src / "Hands").glob("*.jpg"):
        image.unlink()
    message = _prepare_error(own_src, tmp_path / "out", capsys)
    assert message.endswith(
        "; they are not one folder deeper either: --src must hold"
        " HandInfo.csv and Hands/ with the images directly inside it"
    )


def test_handinfo_csv_one_folder_deeper_is_located(own_src, tmp_path):
    nested = tmp_path / "download"
    nested.mkdir()
    shutil.move(own_src, nested / "11k")
    with pytest.raises(DataError) as error:
        prepare_11k(nested, "dorsal_r", tmp_path / "out", progress=False)
    assert str(error.value).endswith(
        f"; found {nested / '11k' / 'HandInfo.csv'}: use --src {nested / '11k'}"
    )


def test_skipped_file_warnings_stop_after_a_few_lines(tmp_path, capsys):
    report = _splits.new_report()
    missing = [Sample(f"gone_{i:02d}.jpg", "1") for i in range(_splits.MAX_WARNINGS + 5)]
    assert _splits.checked_samples(missing, tmp_path, report) == []
    assert len(report["skipped"]) == len(missing)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == _splits.MAX_WARNINGS + 1
    assert lines[-1].startswith("warning: more files skipped; only the first 20 are printed")


# --- HD -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hd_src(synth_src, tmp_path_factory) -> Path:
    """A tiny HD layout built from synthetic images: 8 subjects (ids 444..451), 3 distractors."""
    src = tmp_path_factory.mktemp("hd")
    groups = list(dorsal_right_files(synth_src).values())
    for folder, first_id, group_slice, per_id in (
        ("1-501", 444, slice(0, 8), 3),
        ("502-712", 502, slice(8, 11), 2),
    ):
        target = src / "Original Images" / folder
        target.mkdir(parents=True)
        for offset, names in enumerate(groups[group_slice]):
            for k, name in enumerate(names[:per_id]):
                shutil.copy(synth_src / "Hands" / name, target / f"{first_id + offset}_{k + 1}.jpg")
    (src / "Original Images" / "1-501" / "Thumbs.db").write_bytes(b"\0")  # ignored: not an image
    return src


def test_hd_distractors_are_only_in_galleries_under_distinct_ids(hd_src, tmp_path):
    manifest = prepare_hd(hd_src, tmp_path, progress=False)
    distractors = {f"502-712/{502 + i}_{k}.jpg" for i in range(3) for k in (1, 2)}
    assert manifest.dataset == "hd" and manifest.aspect is None
    assert not distractors & paths(manifest.train + manifest.val.query + manifest.val.gallery)
    for split in manifest.test_splits:
        assert distractors <= paths(split.gallery)
        assert not distractors & paths(split.query)
        extra = ids(split.gallery) - ids(split.query)
        assert extra == {"distractor_502", "distractor_503", "distractor_504"}
        genuine = [s for s in split.gallery if not s.identity.startswith("distractor_")]
        assert len(genuine) == len(ids(split.query))
    assert ids(manifest.train) | ids(manifest.val.query) == {"444", "445", "446", "447"}


def test_hd_upstream_split_is_id_at_most_447(hd_src, tmp_path):
    manifest = prepare_hd(
        hd_src,
        tmp_path,
        identity_split="upstream",
        identity_set="upstream_all_train",
        progress=False,
    )
    assert ids(manifest.train) == {"444", "445", "446", "447"}
    assert ids(manifest.test_splits[0].query) == {"448", "449", "450", "451"}


def test_hd_missing_folder_names_the_path(tmp_path):
    (tmp_path / "Original Images" / "1-501").mkdir(parents=True)
    with pytest.raises(DataError, match=r"502-712 not found: expected the HD layout"):
        prepare_hd(tmp_path, tmp_path / "out", progress=False)


def _hd_copy(hd_src: Path, target: Path) -> Path:
    return Path(shutil.copytree(hd_src, target))


def _hd_error(src: Path, out: Path) -> str:
    with pytest.raises(DataError) as error:
        prepare_hd(src, out, progress=False)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_hd_images_one_folder_deeper_are_located(hd_src, tmp_path):
    src = _hd_copy(hd_src, tmp_path / "hd")
    subjects = src / "Original Images" / "1-501"
    (subjects / "1-501").mkdir()
    for image in subjects.glob("*.jpg"):
        image.rename(subjects / "1-501" / image.name)  # 1-501.zip unpacked inside 1-501/
    assert _hd_error(src, tmp_path / "out") == (
        f"{subjects} holds no images: expected the HD layout 'Original Images/1-501/' and"
        f" 'Original Images/502-712/'; the images are one folder deeper, in"
        f" {subjects / '1-501'}/: move them up into {subjects}/"
    )


def test_hd_src_at_the_wrong_level_names_the_right_one(hd_src, tmp_path):
    outer = tmp_path / "download"
    src = _hd_copy(hd_src, outer / "HD")
    assert _hd_error(outer, tmp_path / "out").endswith(
        f"; found {src / 'Original Images' / '1-501'}/: use --src {src}"
    )
    inner = src / "Original Images"
    assert _hd_error(inner, tmp_path / "out").endswith(
        f"; found {inner / '1-501'}/: use --src {src}"
    )


def test_hd_subjects_folder_without_images_is_refused(hd_src, tmp_path):
    src = _hd_copy(hd_src, tmp_path / "hd")
    for image in (src / "Original Images" / "1-501").glob("*.jpg"):
        image.unlink()
    assert _hd_error(src, tmp_path / "out").startswith(
        f"{src / 'Original Images' / '1-501'} holds no images: expected the HD layout"
    )


def test_an_hd_folder_checks_the_dataset_and_has_no_aspect_to_check(hd_src, tmp_path):
    manifest = prepare_hd(hd_src, tmp_path, progress=False)
    for aspect in ASPECTS:
        check_prepared_for(manifest, "hd", aspect, tmp_path)
    with pytest.raises(DataError, match=r"key 'dataset': 11k, but the folder was prepared for hd "
                                        r"\(set dataset: hd,"):
        check_prepared_for(manifest, "11k", "dorsal_r", tmp_path)


# --- image store and transforms -------------------------------------------------------------


def test_store_rows_hold_the_resized_images(manifest, tmp_path):
    store = ImageStore.build(manifest, 32, tmp_path, progress=False)
    samples = manifest.all_samples()
    assert len(store) == len(samples) and store.images.shape == (len(samples), 32, 32, 3)
    sample = manifest.test_splits[0].gallery[0]
    expected = np.array(
        Image.open(manifest.abspath(sample)).resize((32, 32), Image.Resampling.BILINEAR)
    )
    batch = store.batch(store.rows([sample, sample]))
    assert batch.dtype == torch.uint8 and batch.shape == (2, 3, 32, 32)
    assert torch.equal(batch[0], torch.from_numpy(expected).permute(2, 0, 1))
    assert store.rows(samples).tolist() != [] and sorted(store.rows(samples).tolist()) == list(
        range(len(samples))
    )


def test_second_store_build_maps_the_cache_without_decoding(manifest, tmp_path, monkeypatch):
    first = ImageStore.build(manifest, 24, tmp_path, progress=False)
    decoded = []

    def counting_decoder(path):
        decoded.append(path)
        return original(path)

    original = store_module.decode_rgb
    monkeypatch.setattr(store_module, "decode_rgb", counting_decoder)
    second = ImageStore.build(manifest, 24, tmp_path, progress=False)
    assert decoded == []
    assert isinstance(second.images, np.memmap)
    assert np.array_equal(np.asarray(first.images), np.asarray(second.images))
    ImageStore.build(manifest, 20, tmp_path, progress=False)  # another size is another entry
    assert len(decoded) == len(manifest.all_samples())


def test_store_decodes_again_when_an_image_file_changes(own_src, tmp_path, monkeypatch):
    manifest = prepare_11k(own_src, "dorsal_r", tmp_path / "out", progress=False)
    ImageStore.build(manifest, 16, tmp_path / "cache", progress=False)
    changed = manifest.abspath(manifest.train[0])
    Image.new("RGB", (64, 48), (255, 0, 0)).save(changed)
    store = ImageStore.build(manifest, 16, tmp_path / "cache", progress=False)
    red = store.batch(store.rows(manifest.train[:1]))[0]
    assert red[0].min() > 240 and red[1].max() < 15


def test_store_names_an_image_broken_after_prepare(own_src, tmp_path):
    manifest = prepare_11k(own_src, "dorsal_r", tmp_path / "out", progress=False)
    broken = manifest.abspath(manifest.val.gallery[0])
    broken.write_text("garbage")
    with pytest.raises(DataError, match=f"{broken.name}: cannot decode image"):
        ImageStore.build(manifest, 16, tmp_path / "cache", progress=False)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no partial entry


def test_normalize_uses_clip_statistics():
    mean_colour = torch.tensor([round(m * 255) for m in CLIP_MEAN], dtype=torch.uint8)
    batch = torch.stack(
        [mean_colour.view(3, 1, 1).expand(3, 4, 4), torch.full((3, 4, 4), 255, dtype=torch.uint8)]
    )
    normalized = normalize(batch)
    assert normalized.dtype == torch.float32
    assert normalized[0].abs().max() < 0.01
    white = [(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]
    assert torch.allclose(normalized[1, :, 0, 0], torch.tensor(white))
    assert torch.equal(normalize(batch, normalize=False), batch.float() / 255)


def test_augment_is_deterministic_for_a_generator():
    batch = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    aug = Augment(hflip=0.5, pad_crop=3, random_erasing=0.5)
    first = augment(batch, aug, torch.Generator().manual_seed(1))
    again = augment(batch, aug, torch.Generator().manual_seed(1))
    other = augment(batch, aug, torch.Generator().manual_seed(2))
    assert first.shape == batch.shape
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first, batch)
    flipped = augment(batch, Augment(hflip=1.0), torch.Generator())
    assert torch.equal(flipped, batch.flip(-1))
    assert torch.equal(augment(batch, Augment(hflip=0.0), torch.Generator()), batch)


# --- samplers -------------------------------------------------------------------------------


def test_pk_batches_hold_p_identities_with_k_images_each():
    labels = [i // 5 for i in range(40)] + [8, 8]  # 8 identities x 5 images, one with only 2
    sampler = PKSampler(labels, p=3, k=4, seed=0)
    assert len(sampler) == 42 // 12
    for epoch in range(5):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        for batch in batches:
            per_identity = Counter(labels[i] for i in batch)
            assert len(per_identity) == 3 and set(per_identity.values()) == {4}


def test_pk_sampler_is_deterministic_per_seed_and_epoch():
    labels = [i % 10 for i in range(100)]

    def batches(seed, epoch):
        sampler = PKSampler(labels, p=4, k=2, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert batches(0, 3) == batches(0, 3)
    assert batches(0, 3) != batches(0, 4)
    assert batches(0, 3) != batches(1, 3)
    with pytest.raises(ValueError, match="only 10 identities"):
        PKSampler(labels, p=11, k=2, seed=0)


def test_random_batch_sampler_covers_every_index_once_per_epoch():
    sampler = RandomBatchSampler(10, batch_size=4, seed=0)
    assert len(sampler) == 3 and len(RandomBatchSampler(10, 4, seed=0, drop_last=True)) == 2
    first = list(sampler)
    assert sorted(i for batch in first for i in batch) == list(range(10))
    assert first == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
