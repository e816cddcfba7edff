"""Reliability and safety: bad input, corrupt data, faults during a run, load, and safety checks.

* Bad input: one table of configurations, ``--set`` overrides, model weights, paths, search
  spaces, versions files and datasets, each run through the CLI (``tune_clipfh.cli.main``):
  exit status 2, exactly one ``error:`` line with the expected message, no traceback, and no
  output folder left behind.
* Corrupt data: truncated, empty, missing and non-image ``.jpg`` files are skipped and counted,
  grayscale, RGBA, CMYK and 16-bit images converted and counted, an identity left with one
  image dropped and counted (the policy in ``data/_splits.py``), end to end: ``data prepare``
  -> a one-epoch ``train`` on the result.
* Faults: a NaN loss (``fault_injection: nan@image:2``) ends its trial as ``diverged`` while the
  others finish; a raising trial (``raise@image:2``) is retried from its checkpoint and its
  metrics go on from there; an interrupted checkpoint write leaves the previous one in place,
  and ``train --resume`` continues from it.
* Slow: the driver SIGKILLed (with its Ray processes) mid-experiment, then ``--resume``d,
  gives the same trials and results as an uninterrupted run (SIGINT, the driver alone, is
  ``tests/test_tune.py::test_resume_after_sigint_keeps_finished_trials_and_finishes_the_rest``);
  a worker node of a two-node cluster removed mid-search; a 200-trial search with the driver's
  memory growth bounded.
* Safety: YAML through the safe loader only, ``weights_only`` checkpoints, no shell, eval or
  exec, no Ray dashboard; Ray's token authentication on, with a private token file, so a
  driver without the token cannot attach to a cluster the project starts (and what Ray itself
  listens on).
"""

from __future__ import annotations

import ast
import ipaddress
import json
import math
import os
import re
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image
from ray.tune import ExperimentAnalysis

from tune_clipfh.cli import main
from tune_clipfh.config import build_config
from tune_clipfh.data.hands11k import prepare_11k
from tune_clipfh.data.manifest import load_manifest
from tune_clipfh.data.synth import synthesize
from tune_clipfh.model.backbone import create_backbone
from tune_clipfh.train import run as run_module
from tune_clipfh.tune import ray_session
from tune_clipfh.tune.experiment import (
    ExperimentOptions,
    fixed_trials,
    reproduce,
    run_fixed_trials,
)
from tune_clipfh.tune.progress import trial_label
from tune_clipfh.tune.ray_session import AUTH_MODE_VAR, TOKEN_PATH_VAR, TOKEN_VAR, init_ray
from tune_clipfh.tune.results import load_results

from handinfo_csv import COLUMNS, dorsal_right_files, read_rows, write_rows
from tune_helpers import one_trial_done_another_checkpointed, rows_reported, tune_lines, wait_for

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tune_clipfh"
CLI = str(Path(sys.executable).parent / "tune-clipfh")

# A small dataset: 12 identities -> 6 train-side (2 of them validation), 6 test identities.
SMALL_SYNTH = {"identities": 12, "images_per_identity": 5, "image_size": (64, 48),
               "progress": False}
TINY_TRAIN = {"profile": "tiny", "pretrained": "none", "epochs_prompt": 1, "epochs_image": 1,
              "early_stop_patience": 0, "n_ctx": 4}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _yaml(knobs: dict) -> str:
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in knobs.items())


@pytest.fixture(scope="module")
def pristine_src(tmp_path_factory) -> Path:
    """A small synthetic 11k-layout dataset; cases copy it before damaging it."""
    return synthesize(tmp_path_factory.mktemp("src"), **SMALL_SYNTH)


@pytest.fixture(scope="module")
def small_data(pristine_src, tmp_path_factory) -> Path:
    """The small dataset prepared (dorsal_r): a ``data_dir`` for training runs and experiments."""
    out = tmp_path_factory.mktemp("small-prepared")
    prepare_11k(pristine_src, "dorsal_r", out, progress=False)
    return out


# ------------------------------------------------------------------------------------------
# Bad input: one table, every case through the CLI


@dataclass
class Ctx:
    tmp: Path
    src: Path  # the pristine dataset (copy it before damaging it: `ctx.own_src()`)
    data: Path  # the small prepared dataset
    monkeypatch: pytest.MonkeyPatch

    def own_src(self) -> Path:
        return Path(shutil.copytree(self.src, self.tmp / "src"))


@dataclass
class Case:
    """``setup(ctx)`` writes the bad input and returns (argv, expected message, output folder
    that must not exist afterwards or None). A message starting with ``re:`` is a regular
    expression the whole message must match."""

    id: str
    setup: Callable[[Ctx], tuple[list[str], str, Path | None]]


def _train(ctx: Ctx, knobs: dict | str, name: str = "run.yaml"):
    """``train --config FILE --out DIR`` with ``knobs`` (a mapping, or raw YAML text)."""
    text = knobs if isinstance(knobs, str) else _yaml(knobs)
    config = _write(ctx.tmp / name, text)
    out = ctx.tmp / "out" / "run"
    return config, ["train", "--config", str(config), "--out", str(out), "--no-progress"], out


def _config_case(knobs: dict | str, message: str):
    """A configuration refused by `train`: the message follows '<file>: '."""
    def setup(ctx: Ctx):
        config, argv, out = _train(ctx, knobs)
        return argv, f"{config}: {message}", out
    return setup


def _space_case(text: str, message: str):
    def setup(ctx: Ctx):
        space = _write(ctx.tmp / "space.yaml", text)
        storage = ctx.tmp / "ray"
        argv = ["search", "--space", str(space), "--storage", str(storage), "--name", "bad"]
        return argv, f"{space}: {message}", storage
    return setup


VERSIONS_HEAD = """
profiles: {full: {}}
backbones:
  vitb16:
    v1: {thesis_run: true, note: first, set: {lr: 1.0e-4}}
"""


def _versions_case(entries: str, message: str):
    """A versions file whose `vitb16` versions continue with ``entries``; read by
    `tune-clipfh versions` in place of search_spaces/versions.yaml."""
    def setup(ctx: Ctx):
        path = _write(ctx.tmp / "versions.yaml", VERSIONS_HEAD + entries)
        ctx.monkeypatch.setattr("tune_clipfh.tune.versions.VERSIONS_FILE", path)
        return ["versions", "--backbone", "vitb16"], f"{path} {message}", None
    return setup


def _prepare_argv(src: Path, out: Path) -> list[str]:
    return ["data", "prepare", "--src", str(src), "--aspect", "dorsal_r", "--out", str(out)]


def _data_case(damage: Callable[[Path], str]):
    """``damage(src)`` breaks a copy of the dataset and returns the expected message."""
    def setup(ctx: Ctx):
        src = ctx.own_src()
        message = damage(src)
        out = ctx.tmp / "prepared"
        return _prepare_argv(src, out), message, out
    return setup


def _no_csv(src: Path) -> str:
    (src / "HandInfo.csv").unlink()
    return (f"HandInfo.csv not found in {src}: expected the 11k Hands layout "
            f"(HandInfo.csv and Hands/)")


def _missing_column(src: Path) -> str:
    write_rows(src, read_rows(src), [c for c in COLUMNS if c != "aspectOfHand"])
    return (f"{src / 'HandInfo.csv'}: missing column(s) aspectOfHand; an 11k HandInfo.csv needs "
            f"id, accessories, aspectOfHand, imageName")


def _no_dorsal_right(src: Path) -> str:
    rows = [r for r in read_rows(src) if r["aspectOfHand"] != "dorsal right"]
    write_rows(src, rows)
    return (f"{src / 'HandInfo.csv'}: no row has aspectOfHand 'dorsal right' and accessories 0 "
            f"({len(rows)} rows read), so aspect dorsal_r has no identities to prepare")


def _one_image_each(src: Path) -> str:
    rows, seen = [], set()
    for row in read_rows(src):
        key = (row["id"], row["aspectOfHand"], row["accessories"])
        if row["aspectOfHand"] == "dorsal right" and key in seen:
            continue
        seen.add(key)
        rows.append(row)
    write_rows(src, rows)
    return (f"{src / 'HandInfo.csv'}: no identity has 2 usable images (12 identities with fewer "
            f"were dropped, 0 image files skipped); a query/gallery pair needs 2 images of one "
            f"identity")


def _escaping_image_name(src: Path) -> str:
    rows = read_rows(src)
    rows[3]["imageName"] = "../../secret.jpg"
    write_rows(src, rows)
    return (f"{src / 'HandInfo.csv'}: line 5: column 'imageName' is '../../secret.jpg'; it must "
            f"be a relative path inside Hands/ (no absolute path, no '..')")


def _absolute_image_name(src: Path) -> str:
    rows = read_rows(src)
    rows[0]["imageName"] = "/etc/passwd"
    write_rows(src, rows)
    return (f"{src / 'HandInfo.csv'}: line 2: column 'imageName' is '/etc/passwd'; it must "
            f"be a relative path inside Hands/ (no absolute path, no '..')")


def _src_does_not_exist(ctx: Ctx):
    src = ctx.tmp / "nowhere"
    out = ctx.tmp / "prepared"
    return _prepare_argv(src, out), (f"HandInfo.csv not found in {src}: expected the 11k Hands "
                                     f"layout (HandInfo.csv and Hands/)"), out


def _data_dir_does_not_exist(ctx: Ctx):
    missing = ctx.tmp / "not-prepared"
    _, argv, out = _train(ctx, {**TINY_TRAIN, "data_dir": str(missing)})
    return argv, (f"data_dir {missing}: path does not exist (expected a folder written by "
                  f"`tune-clipfh data prepare`)"), out


def _resume_does_not_exist(ctx: Ctx):
    run = ctx.tmp / "no-run"
    return ["train", "--resume", str(run)], f"{run / 'config.yaml'}: file not found", run


def _openai_offline(ctx: Ctx):
    # cache_dir: an empty folder, so weights cached on this machine cannot be found either.
    knobs = {"profile": "full", "model": "vitb16", "pretrained": "openai",
             "data_dir": str(ctx.data), "cache_dir": str(ctx.tmp / "cache"),
             "epochs_prompt": 1, "epochs_image": 1}
    _, argv, out = _train(ctx, knobs)
    return argv, ("pretrained: openai needs the ViT-B-16 OpenAI weights, which are not cached "
                  "and cannot be downloaded (offline: HF_HUB_OFFLINE is set). Download them on "
                  "a connected machine (open_clip.create_model('ViT-B-16', pretrained='openai') "
                  "caches them) or set pretrained: /path/to/ViT-B-16.pt"), out


def _wrong_architecture(ctx: Ctx):
    weights = ctx.tmp / "tiny-rn.pt"
    torch.save(create_backbone("rn50", "tiny").clip.state_dict(), weights)
    _, argv, out = _train(ctx, {**TINY_TRAIN, "model": "vitb16", "pretrained": str(weights),
                                "data_dir": str(ctx.data)})
    return argv, (rf"re:pretrained: {re.escape(str(weights))} does not fit the tiny-vit "
                  r"architecture: missing keys \d+ \(e\.g\. [^;]+\); unexpected keys \d+ "
                  r"\(e\.g\. [^;]+\)(; shape mismatches \d+ \(e\.g\. [^;]+\))?"), out


def _not_a_weights_file(ctx: Ctx):
    weights = _write(ctx.tmp / "weights.pt", "not weights\n")
    _, argv, out = _train(ctx, {**TINY_TRAIN, "pretrained": str(weights),
                                "data_dir": str(ctx.data)})
    return argv, (rf"re:pretrained: {re.escape(str(weights))} is not a weights file open_clip "
                  r"can read \(.+\)"), out


def _unknown_set_key(ctx: Ctx):
    config, argv, out = _train(ctx, TINY_TRAIN)
    return [*argv, "--set", "epochs_imgae=2"], ("--set: key 'epochs_imgae': unknown key "
                                                "(did you mean 'epochs_image'?)"), out


def _search_set_out_of_range(ctx: Ctx):
    storage = ctx.tmp / "ray"
    return (["search", "--objective", "rank1", "--num-samples", "0", "--storage", str(storage),
             "--name", "bad", "--set", "lr=0"],
            "re:.*key 'lr': 0\\.0 is out of range \\(valid: \\(0, 10\\]\\)", storage)


ALL_LOSSES_OFF = {"loss_use_id": False, "loss_use_triplet": False, "loss_use_center": False,
                  "loss_use_i2t": False}

CASES = [
    # --- configuration (train --config FILE --out DIR) ---
    Case("config-unknown-key", _config_case(
        {"colour": "blue"}, "key 'colour': unknown key (see `tune-clipfh config keys`)")),
    Case("config-misspelt-key", _config_case(
        {"unfreez_blocks": 2}, "key 'unfreez_blocks': unknown key (did you mean "
                               "'unfreeze_blocks'?) (see `tune-clipfh config keys`)")),
    Case("config-wrong-type", _config_case(
        {"n_ctx": "four"}, "key 'n_ctx': expected an integer, got 'four'")),
    Case("config-wrong-type-bool", _config_case(
        {"loss_use_triplet": "maybe"}, "key 'loss_use_triplet': expected true or false, "
                                       "got 'maybe'")),
    Case("config-not-a-choice", _config_case(
        {"optimizer": "adagrad"}, "key 'optimizer': 'adagrad' is not valid (valid: adam, "
                                  "adamw, sgd)")),
    Case("config-unfreeze-beyond-tower", _config_case(
        {"model": "rn50", "unfreeze_blocks": 5},
        "key 'unfreeze_blocks': 5 is out of range for model rn50, whose image tower has 4 "
        "blocks (valid: 0..4)")),
    Case("config-negative-lr", _config_case(
        {"lr": -1e-4}, "key 'lr': -0.0001 is out of range (valid: (0, 10])")),
    Case("config-arcface-margin-pi-half", _config_case(
        {"id_head": "arcface", "arcface_margin": 1.6},
        "key 'arcface_margin': 1.6 is out of range (valid: [0, pi/2))")),
    Case("config-pk-not-dividing-batch", _config_case(
        {"batch_size": 30, "pk_k": 4}, "key 'pk_k': P x K sampling needs batch_size divisible "
                                       "by pk_k (batch_size 30, pk_k 4)")),
    Case("config-prompt-only-without-prompt-epochs", _config_case(
        {"stage_mode": "prompt_only", "epochs_prompt": 0},
        "key 'epochs_prompt': stage_mode prompt_only runs the prompt stage, which needs "
        "epochs_prompt >= 1")),
    Case("config-every-loss-off", _config_case(
        ALL_LOSSES_OFF, "key 'loss_use_id': every image-stage loss is off (loss_use_id, "
                        "loss_use_triplet, loss_use_center, loss_use_i2t): turn at least one on")),
    Case("config-bad-fault-injection", _config_case(
        {"fault_injection": "nan@image"},
        "key 'fault_injection': 'nan@image' is not valid (valid: nan@STAGE:EPOCH or "
        "raise@STAGE:EPOCH, STAGE prompt or image, e.g. nan@image:2)")),
    Case("config-malformed-yaml", _config_case(
        "model: vitb16\nlr: [1e-4\nseed: 1\n", "line 3: malformed YAML: expected ',' or ']', "
                                               "but got ':'")),
    Case("config-not-a-mapping", _config_case(
        "- lr\n- seed\n", "expected a mapping of key: value at the top level, got list")),
    Case("config-tiny-with-openai", _config_case(
        {"profile": "tiny", "pretrained": "openai"},
        "key 'pretrained': openai weights exist only for the full profile (valid in the tiny "
        "profile: synthetic, none or a weights file path)")),
    Case("config-full-with-synthetic", _config_case(
        {"profile": "full", "pretrained": "synthetic"},
        "key 'pretrained': synthetic weights exist only for the tiny profile (valid in the full "
        "profile: openai, none or a weights file path)")),
    Case("set-unknown-key", _unknown_set_key),
    Case("set-out-of-range", _search_set_out_of_range),
    # --- model weights ---
    Case("pretrained-openai-offline", _openai_offline),
    Case("pretrained-wrong-architecture", _wrong_architecture),
    Case("pretrained-not-a-weights-file", _not_a_weights_file),
    # --- paths ---
    Case("data-dir-does-not-exist", _data_dir_does_not_exist),
    Case("resume-run-does-not-exist", _resume_does_not_exist),
    Case("prepare-src-does-not-exist", _src_does_not_exist),
    # --- search spaces (search --space FILE) ---
    Case("space-condition-names-unknown-parameter", _space_case(
        "parameters:\n  id_head: {type: categorical, choices: [linear, arcface]}\n"
        "  arcface_scale: {type: float, low: 10, high: 64, when: {id_hed: arcface}}\n",
        "parameter 'arcface_scale': condition names 'id_hed', which is not an earlier parameter "
        "of this space (did you mean 'id_head'?)")),
    Case("space-empty-range", _space_case(
        "parameters:\n  lr_visual: {type: float, low: 1.0e-3, high: 1.0e-3, log: true}\n",
        "parameter 'lr_visual': empty range (low 0.001 must be below high 0.001)")),
    Case("space-unknown-parameter", _space_case(
        "parameters:\n  lr_visaul: {type: float, low: 1.0e-5, high: 1.0e-3}\n",
        "parameter 'lr_visaul': not a configuration key (did you mean 'lr_visual'?)")),
    # --- versions files (tune-clipfh versions, reading the file in place of versions.yaml) ---
    Case("versions-inherits-undefined", _versions_case(
        "    v2: {inherits: v9, thesis_run: true, note: second}\n",
        "[vitb16 v2]: inherits 'v9', which is not defined (defined: v1, v2)")),
    Case("versions-inheritance-cycle", _versions_case(
        "    v2: {inherits: v3, thesis_run: true, note: second}\n"
        "    v3: {inherits: v2, thesis_run: true, note: third}\n",
        "[vitb16 v2]: inheritance cycle v2 -> v3 -> v2")),
    # --- datasets (data prepare --src DIR --aspect dorsal_r --out DIR) ---
    Case("data-missing-handinfo", _data_case(_no_csv)),
    Case("data-missing-column", _data_case(_missing_column)),
    Case("data-aspect-without-identities", _data_case(_no_dorsal_right)),
    Case("data-identities-with-one-image", _data_case(_one_image_each)),
    Case("data-image-name-leaves-root", _data_case(_escaping_image_name)),
    Case("data-image-name-absolute", _data_case(_absolute_image_name)),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_clear_error_and_leaves_no_output(case, tmp_path, pristine_src,
                                                           small_data, monkeypatch, capsys):
    argv, expected, out = case.setup(Ctx(tmp_path, pristine_src, small_data, monkeypatch))
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line.removeprefix("error: ") for line in err.splitlines()
              if line.startswith("error: ")]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    if expected.startswith("re:"):
        assert re.fullmatch(expected[3:], errors[0]), errors[0]
    else:
        assert errors[0] == expected
    if out is not None:
        leftovers = sorted(p for p in out.rglob("*")) if out.exists() else []
        assert not out.exists(), f"{out} left behind: {leftovers}"


def test_bad_input_table_covers_the_issue():
    assert len(CASES) >= 20


# ------------------------------------------------------------------------------------------
# Corrupt data, end to end: prepare -> train


def test_corrupt_images_are_skipped_or_converted_and_counted_end_to_end(pristine_src, tmp_path,
                                                                        capsys):
    """The policy of data/_splits.py: broken files skipped and counted, other modes converted
    and counted, identities left with one image dropped and counted; training runs on it."""
    src = Path(shutil.copytree(pristine_src, tmp_path / "src"))
    hands = src / "Hands"
    groups = sorted(dorsal_right_files(src).items())
    big = [names for _, names in groups if len(names) >= 4]
    # Skipped: one broken file in each of three identities with 4+ images (none drops below 2).
    truncated, empty, text = big[0][-1], big[1][-1], big[2][-1]
    data = (hands / truncated).read_bytes()
    (hands / truncated).write_bytes(data[: len(data) // 2])
    (hands / empty).write_bytes(b"")
    (hands / text).write_text("<html>not an image</html>\n")
    # Converted: grayscale, RGBA (a PNG named .jpg), CMYK and 16-bit (a PNG named .jpg).
    gray, rgba, cmyk, deep = big[3][0], big[3][1], big[4][0], big[4][1]
    Image.new("L", (64, 48), 90).save(hands / gray, format="JPEG")
    Image.new("RGBA", (64, 48), (10, 200, 30, 128)).save(hands / rgba, format="PNG")
    Image.new("CMYK", (64, 48), (0, 50, 100, 0)).save(hands / cmyk, format="JPEG")
    Image.fromarray(np.full((48, 64), 200 * 257, dtype=np.uint16)).save(hands / deep,
                                                                         format="PNG")
    # Dropped: an identity left with one usable image.
    lonely, lonely_names = next((i, n) for i, n in groups if n not in big[:5] and len(n) >= 2)
    for name in lonely_names[1:]:
        (hands / name).unlink()  # missing files are skipped too

    prepared = tmp_path / "prepared"
    capsys.readouterr()
    assert main(["data", "prepare", "--src", str(src), "--aspect", "dorsal_r",
                 "--out", str(prepared)]) == 0
    err = capsys.readouterr().err
    broken = {truncated, empty, text, *lonely_names[1:]}
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipping ")]
    assert sorted(line.split()[2].rstrip(":") for line in warnings) == sorted(broken), err

    manifest = load_manifest(prepared)
    report = manifest.report
    reasons = {entry["file"]: entry["reason"] for entry in report["skipped"]}
    assert set(reasons) == broken
    assert reasons[truncated].startswith("unreadable image (")
    assert reasons[empty] == "empty file (0 bytes)"
    assert reasons[text].startswith("unreadable image (UnidentifiedImageError")
    assert all(reasons[name] == "missing file" for name in lonely_names[1:])
    assert {entry["file"]: entry["mode"] for entry in report["converted"]} == {
        gray: "L", rgba: "RGBA", cmyk: "CMYK", deep: "I;16"}
    assert [entry["identity"] for entry in report["dropped_identities"]] == [lonely]
    used = {s.path for s in manifest.all_samples()}
    assert not used & broken and {gray, rgba, cmyk, deep} <= used
    assert lonely not in {s.identity for s in manifest.all_samples()}
    # The counts are visible in the manifest's summary, printed by prepare.
    summary = (f"skipped {len(broken)} files, converted 4 to RGB, dropped 1 identities")
    assert summary in manifest.summary() and summary in err

    config = _write(tmp_path / "train.yaml", _yaml({**TINY_TRAIN, "model": "rn50",
                                                    "data_dir": str(prepared)}))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "status: completed; epochs run: {'prompt': 1, 'image': 1}" in out, out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [("prompt", 1), ("image", 1)]
    assert all(math.isfinite(r["prompt_loss" if r["stage"] == "prompt" else "loss_total"])
               for r in rows)
    # Safety: the best checkpoint loads with weights_only=True (no pickled code).
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == 1 and best["backbone"] == "tiny-rn"
    assert sorted(best["identities"]) == sorted(manifest.train_identities())


# ------------------------------------------------------------------------------------------
# An interrupted checkpoint write


def _quiet(_line: str) -> None:
    pass


def test_interrupted_checkpoint_write_keeps_the_previous_checkpoint(small_data, tmp_path,
                                                                    monkeypatch, capsys):
    knobs = {**TINY_TRAIN, "model": "rn50", "data_dir": str(small_data), "epochs_image": 3,
             "checkpoint_every": 1, "seed": 2}
    config = build_config(knobs, "test").config
    full = run_module.train_run(config, tmp_path / "full", log=_quiet, progress=False)

    real_save = torch.save

    def disk_full_at_iteration_3(payload, target, *args, **kwargs):
        # state.pt after image epoch 2: write part of it, then fail (the disk is full).
        if Path(target).name.startswith(".state.pt.") and payload.get("iteration") == 3:
            Path(target).write_bytes(b"PK\x03\x04" + b"\0" * 100)
            raise OSError(28, "No space left on device")
        return real_save(payload, target, *args, **kwargs)

    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(run_module.torch, "save", disk_full_at_iteration_3)
        with pytest.raises(OSError, match="No space left on device"):
            run_module.train_run(config, run_dir, log=_quiet, progress=False)
    # No partial file; the previous checkpoint (image epoch 1) is intact and loads.
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "config.yaml",
                                                          "metrics.jsonl", "state.pt"]
    state = run_module.load_torch(run_dir / "state.pt")  # weights_only=True
    assert (state["stage"], state["epoch_done"], state["iteration"]) == ("image", 1, 2)

    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert (f"[train] resumed from {run_dir / 'state.pt'} (image stage, epoch 1 done)"
            in captured.err), captured.err
    assert "status: completed; epochs run: {'prompt': 1, 'image': 3}" in captured.out
    # It went on from that checkpoint: the same run as one never interrupted, each epoch
    # recorded once.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    full_rows = [json.loads(line)
                 for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_total"] for r in rows[1:]] == [r["loss_total"] for r in full_rows[1:]]
    resumed_test = json.loads((run_dir / "test_results.json").read_text())
    assert resumed_test["mean"] == pytest.approx(full.test["mean"], abs=0)
    assert not (run_dir / "state.pt").exists()  # finished: no resumable state left


# ------------------------------------------------------------------------------------------
# Faults in trials: a NaN loss, a raising trial (one experiment, in the shared Ray session)

FAULT_OVERRIDES = {"epochs_prompt": 1, "epochs_image": 3, "early_stop_patience": 0,
                   "checkpoint_every": 1, "checkpoint_min_interval_s": 0}
FAULTS = {"v1": "nan@image:2", "v5": "raise@image:2"}  # v6 runs clean


@pytest.fixture(scope="module")
def fault_experiment(ray_session, small_data, tmp_path_factory):
    trials = fixed_trials(["rn50"], ["v1", "v5", "v6"], "tiny", FAULT_OVERRIDES)
    for trial in trials:
        if trial["version"] in FAULTS:
            trial["fault_injection"] = FAULTS[trial["version"]]
    options = ExperimentOptions(name="faults", storage=str(tmp_path_factory.mktemp("ray")),
                                data=str(small_data), max_concurrent=2, max_failures=1)
    path = run_fixed_trials(trials, options, "faults", {"versions": ["v1", "v5", "v6"]})
    return path, load_results(path).set_index("label")


def test_nan_loss_ends_the_trial_as_diverged_and_the_experiment_goes_on(fault_experiment):
    _, frame = fault_experiment
    assert sorted(frame.index) == ["rn50-v1-s0", "rn50-v5-s0", "rn50-v6-s0"]
    assert (frame["final"] == 1).all() and (frame["trial_status"] == "TERMINATED").all()
    nan = frame.loc["rn50-v1-s0"]
    assert nan["config/fault_injection"] == "nan@image:2"
    assert nan["status"] == "diverged"
    assert (nan["diverged_stage"], nan["diverged_epoch"]) == ("image", 2)
    # Its last good epoch (image epoch 1) is what it reports, not NaN; no test after divergence.
    assert (nan["epochs_prompt_run"], nan["epochs_image_run"], nan["best_epoch"]) == (1, 1, 1)
    for column in ("best_val_rank1", "best_val_mAP", "val_rank1", "val_mAP", "loss_total"):
        assert math.isfinite(nan[column]), column
    assert nan["best_val_rank1"] == nan["val_rank1"] and 0 <= nan["best_val_rank1"] <= 1
    assert math.isnan(nan["test_rank1"])
    # The other trials completed, with their test metrics.
    others = frame.drop(index="rn50-v1-s0")
    assert (others["status"] == "completed").all()
    assert others["test_rank1"].between(0, 1).all()
    assert (others["epochs_image_run"] == 3).all()


def test_raising_trial_is_retried_from_its_checkpoint_and_continues(fault_experiment):
    path, frame = fault_experiment
    analysis = ExperimentAnalysis(str(path))
    trials = {trial_label(t.config): t for t in analysis.trials}
    raised = trials["rn50-v5-s0"]
    assert raised.num_failures == 1
    assert [t.num_failures for label, t in trials.items() if label != "rn50-v5-s0"] == [0, 0]
    history = analysis.trial_dataframes[raised.trial_id]
    epochs = history[history["final"] == 0]
    # prompt 1, image 1 [checkpoint], the fault at image 2, restore, image 2, image 3: one row
    # per epoch, never back to epoch 1.
    assert epochs["epoch"].tolist() == [1, 2, 3, 4]
    assert list(zip(epochs["stage"], epochs["stage_epoch"], strict=True)) == [
        ("prompt", 1), ("image", 1), ("image", 2), ("image", 3)]
    assert history["training_iteration"].tolist() == [1, 2, 3, 4, 5]
    assert history["iterations_since_restore"].tolist() == [1, 2, 1, 2, 3]
    last = history.iloc[-1]
    assert last["final"] == 1 and last["status"] == "completed"
    assert frame.loc["rn50-v5-s0", "status"] == "completed"
    assert 0 <= frame.loc["rn50-v5-s0", "test_rank1"] <= 1


# ------------------------------------------------------------------------------------------
# Safety


def _package_trees() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path)))
            for path in sorted(PACKAGE.rglob("*.py"))]


def _calls(tree: ast.AST):
    return (node for node in ast.walk(tree) if isinstance(node, ast.Call))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_yaml_is_read_only_with_the_safe_loader():
    unsafe = re.compile(r"yaml\.(load|load_all|unsafe_load|unsafe_load_all|full_load|"
                        r"full_load_all)\(|Loader\s*=|yaml\.(Unsafe|Full)?Loader\b")
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for path in sorted(PACKAGE.rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             if unsafe.search(line)]
    assert found == []
    assert any("yaml.safe_load(" in path.read_text() for path in PACKAGE.rglob("*.py"))


def test_checkpoints_are_loaded_with_weights_only():
    loads = []
    for path, tree in _package_trees():
        for call in _calls(tree):
            if _dotted(call.func) in ("torch.load", "pickle.load", "pickle.loads",
                                      "torch.jit.load", "dill.load", "joblib.load"):
                keywords = {k.arg: k.value for k in call.keywords}
                safe = _dotted(call.func) == "torch.load" and isinstance(
                    keywords.get("weights_only"), ast.Constant) and \
                    keywords["weights_only"].value is True
                loads.append((f"{path.relative_to(REPO)}:{call.lineno}", safe))
    assert loads and all(safe for _, safe in loads), loads
    # open_clip loads a weights file with weights_only too; only OpenAI's own TorchScript
    # archive format (which cannot be read weights-only) goes through torch.jit.
    loader = (PACKAGE / "model" / "weights.py").read_text()
    assert "weights_only=False" not in loader and loader.count("weights_only=not torchscript")


def test_no_shell_eval_or_exec_on_user_strings():
    found = []
    for path, tree in _package_trees():
        for call in _calls(tree):
            name = _dotted(call.func)
            shell = any(k.arg == "shell" and not (isinstance(k.value, ast.Constant)
                                                  and k.value.value is False)
                        for k in call.keywords)
            dynamic_import = name in ("__import__", "importlib.import_module") and not all(
                isinstance(arg, ast.Constant) for arg in call.args)
            if name in ("eval", "exec", "compile", "os.system", "os.popen",
                        "subprocess.getoutput", "subprocess.getstatusoutput") or shell \
                    or dynamic_import:
                found.append(f"{path.relative_to(REPO)}:{call.lineno}: {ast.unparse(call)}")
    assert found == []
    text = "\n".join(path.read_text() for path in PACKAGE.rglob("*.py"))
    assert "shell=True" not in text


def test_ray_dashboard_is_off_by_default(monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: calls.append((args, kwargs)))
    init_ray(ExperimentOptions())
    init_ray(ExperimentOptions(address="10.0.0.1:6379"))
    assert len(calls) == 2
    assert all(kwargs["include_dashboard"] is False for _, kwargs in calls)
    assert calls[1][1]["address"] == "10.0.0.1:6379"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_local_cluster_gets_token_auth_with_a_private_token_file(monkeypatch, tmp_path,
                                                                   capsys):
    """Whatever RAY_AUTH_MODE says, a cluster init_ray starts has token authentication (the
    mode left to Ray's own default for new local clusters, token), and the token file is
    created, or made, readable by its owner only; with an address, the user's own Ray
    settings apply untouched."""
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(
        (kwargs, os.environ.get(AUTH_MODE_VAR))))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(TOKEN_VAR, raising=False)
    monkeypatch.delenv(TOKEN_PATH_VAR, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(AUTH_MODE_VAR, "disabled")
    token = tmp_path / ".ray" / "auth_token"

    init_ray(ExperimentOptions())
    assert calls[-1][1] is None  # unset: Ray 2.60 turns token authentication on
    assert f"{AUTH_MODE_VAR}=disabled ignored" in capsys.readouterr().err
    assert len(token.read_text()) == 64 and _mode(token) == 0o600
    assert _mode(token.parent) == 0o700
    if sys.platform.startswith("linux"):
        assert calls[-1][0]["_node_ip_address"] == ray_session.LOCAL_NODE_IP
        assert ipaddress.ip_address(ray_session.LOCAL_NODE_IP).is_loopback

    # A token file others can read is made private; its token is kept.
    secret = token.read_text()
    token.chmod(0o644)
    init_ray(ExperimentOptions())
    assert _mode(token) == 0o600 and token.read_text() == secret
    assert "made readable by its owner only" in capsys.readouterr().err

    # RAY_AUTH_TOKEN_PATH names the token file when set.
    custom = tmp_path / "elsewhere" / "token"
    monkeypatch.setenv(TOKEN_PATH_VAR, str(custom))
    monkeypatch.setenv(AUTH_MODE_VAR, "token")
    init_ray(ExperimentOptions())
    assert calls[-1][1] == "token" and _mode(custom) == 0o600

    # --address: nothing touched.
    monkeypatch.setenv(AUTH_MODE_VAR, "disabled")
    monkeypatch.setenv(TOKEN_PATH_VAR, str(tmp_path / "not-created"))
    init_ray(ExperimentOptions(address="10.0.0.1:6379"))
    assert calls[-1][1] == "disabled" and not (tmp_path / "not-created").exists()
    assert "_node_ip_address" not in calls[-1][0]


def test_nothing_in_the_repository_disables_ray_authentication():
    """No code, test, script, CI step or configuration sets RAY_AUTH_MODE to disabled (the
    docs may say not to)."""
    pattern = re.compile(r"RAY_AUTH_MODE\W{0,6}disabled", re.IGNORECASE)
    skip = {".venv", ".git", "runs", ".cache", "node_modules", "__pycache__"}
    found = []
    for path in REPO.rglob("*"):
        parts = set(path.relative_to(REPO).parts)
        if parts & skip or not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        if path.suffix not in (".py", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".sh", ".json",
                               ".env", "") and path.name != "Makefile":
            continue
        text = path.read_text(errors="replace")
        found += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in pattern.finditer(text)]
    assert found == []



def _process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            tree.append(child)
            todo.append(child)
    return tree


def _listening_sockets(pids: list[int]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket in LISTEN state the processes hold."""
    def address(hex_address: str) -> str:
        raw = bytes.fromhex(hex_address)
        # /proc/net/tcp{,6} print each 32-bit word of the address in host (little-endian) order
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        return str(ipaddress.ip_address(words))

    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                hex_address, hex_port = fields[1].split(":")
                listening[fields[9]] = (address(hex_address), int(hex_port, 16))
    found = []
    for pid in pids:
        try:
            name = (Path("/proc") / str(pid) / "comm").read_text().strip()
            fds = list((Path("/proc") / str(pid) / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in listening:
                found.append((name, *listening[target[8:-1]]))
    return sorted(set(found))


CLUSTER_SCRIPT = """
import os, sys, time
from tune_clipfh.tune.experiment import ExperimentOptions
from tune_clipfh.tune.ray_session import init_ray
init_ray(ExperimentOptions())
import ray
ray.get(ray.remote(lambda: os.getpid()).remote())
print("GCS " + ray.get_runtime_context().gcs_address, flush=True)
print("READY", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.2)
ray.shutdown()
"""

ATTACH_SCRIPT = """
import os, sys
import ray
try:
    ray.init(address=sys.argv[1], include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    pid = ray.get(ray.remote(lambda: os.getpid()).remote(), timeout=60)
except Exception as exc:  # any way of not getting in counts as refused; the test reads why
    print(f"REFUSED {type(exc).__name__}: {exc}", flush=True)
    sys.exit(3)
print(f"RAN {pid}", flush=True)
"""


def _attach_all(script: Path, address: str, envs: list[dict[str, str]],
                timeout: float = 180) -> list[tuple[int, str]]:
    """Drivers of their own (each with exactly ``env`` and a clean rest: no Ray variable of this
    session) attach to ``address`` at once and run a task; (exit status, output) of each."""
    base = {"PATH": os.environ["PATH"], "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
            # How long ray.init retries the GCS before giving up (Ray's default: 20 s).
            "RAY_py_gcs_connect_timeout_s": "5"}
    procs = [subprocess.Popen([sys.executable, str(script), address], env={**base, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=str(REPO)) for env in envs]
    results = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        results.append((proc.returncode, output))
    return results


def test_a_cluster_the_project_starts_refuses_drivers_without_its_token(tmp_path, drivers):
    """Started as the CLI starts one (``init_ray``, for a user with no Ray token yet): no
    dashboard, a private token file, and a driver without the token (no token, or a wrong
    one) can neither attach nor run a task, while one with the token can. Ray 2.60's own gRPC
    servers still listen on every interface (there is no setting to keep them on loopback);
    nothing listens on a specific outward address."""
    home = tmp_path / "home"
    home.mkdir()
    script = _write(tmp_path / "cluster.py", CLUSTER_SCRIPT)
    log, done = tmp_path / "cluster.log", tmp_path / "done"
    proc = drivers.start([sys.executable, str(script), str(done)], log,
                         drop=(AUTH_MODE_VAR, TOKEN_VAR, TOKEN_PATH_VAR), HOME=str(home))
    try:
        assert wait_for(lambda: "READY" in log.read_text(), 180, proc), log.read_text()
        address = next(line.split()[1] for line in log.read_text().splitlines()
                       if line.startswith("GCS "))
        listeners = _listening_sockets(_process_tree(proc.pid))
        token = home / ".ray" / "auth_token"
        assert token.is_file() and _mode(token) == 0o600, token

        attach = _write(tmp_path / "attach.py", ATTACH_SCRIPT)
        stranger = tmp_path / "stranger"
        stranger.mkdir()
        no_token, wrong_token, with_token = _attach_all(attach, address, [
            {"HOME": str(stranger)},
            {"HOME": str(stranger), AUTH_MODE_VAR: "token", TOKEN_VAR: "0" * 64},
            {"HOME": str(home), AUTH_MODE_VAR: "token"}])
        done.touch()
        proc.wait(timeout=60)
    finally:
        drivers.kill(proc)
    for status, output in (no_token, wrong_token):
        assert status == 3 and "REFUSED" in output, output[-3000:]
        assert "RAN" not in output
    assert "Authentication token is missing or incorrect" in no_token[1], no_token[1][-3000:]
    assert with_token[0] == 0 and "RAN" in with_token[1], with_token[1][-3000:]

    assert listeners, "found no listening socket of the Ray processes"
    # No dashboard: nothing on its port (8265) or the Ray client's (10001), no dashboard process.
    assert not [entry for entry in listeners if entry[2] in (8265, 10001)], listeners
    assert not [entry for entry in listeners if "dashboard" in entry[0].lower()], listeners
    # Only Ray's wildcard gRPC listeners are reachable from outside; nothing is bound to the
    # machine's outward address.
    outward = [entry for entry in listeners if not ipaddress.ip_address(entry[1]).is_loopback
               and not ipaddress.ip_address(entry[1]).is_unspecified]
    if sys.platform.startswith("linux"):
        assert outward == [], listeners



# ------------------------------------------------------------------------------------------
# Slow: the driver SIGKILLed mid-experiment, then --resume

KILL_OVERRIDES = {"epochs_prompt": 1, "epochs_image": 12, "early_stop_patience": 0,
                  "checkpoint_every": 1, "checkpoint_min_interval_s": 0}
KILL_VERSIONS = ["v1", "v5", "v6"]


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def _assert_epochs_continue(rows: list[dict]) -> None:
    """The per-epoch rows of a trial that may have been resumed: epochs 1..N with none
    missing and at most one step back, to the epoch after the checkpoint the experiment had
    recorded (Tune keeps the rows reported after it, and the restored trial reports those
    epochs again), never back to epoch 1; a repeated epoch reports the same values."""
    epochs = [r["epoch"] for r in rows]
    assert sorted(set(epochs)) == list(range(1, max(epochs) + 1)), epochs
    back = [i for i in range(1, len(epochs)) if epochs[i] <= epochs[i - 1]]
    assert len(back) <= 1 and all(epochs[i] > 1 for i in back), epochs
    first: dict[int, dict] = {}
    for row in rows:
        seen = first.setdefault(row["epoch"], row)
        for key in ("loss_total", "prompt_loss", "val_rank1", "val_mAP", "best_val_rank1"):
            assert _same(row.get(key), seen.get(key)), (row["epoch"], key)


def _kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started (Ray's GCS, raylet, workers), at once."""
    tree = _process_tree(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group is the driver's pid
    except ProcessLookupError:
        pass
    for pid in tree:  # anything that left the group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def uninterrupted(ray_session, small_data, tmp_path_factory):
    """The interrupted experiments' trials and seeds, run without interruption (in this
    process's Ray session)."""
    path = reproduce(["rn50"], KILL_VERSIONS, ExperimentOptions(
        name="uninterrupted", storage=str(tmp_path_factory.mktemp("ray-baseline")),
        data=str(small_data), max_concurrent=1, overrides=KILL_OVERRIDES))
    return load_results(path)


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_trials_and_results(small_data, tmp_path, drivers,
                                                                  uninterrupted):
    """While the second of three trials runs, the driver is SIGKILLed together with its Ray
    processes; ``--resume`` finishes the experiment with the same trials and the same results as
    an uninterrupted run (same seeds, deterministic CPU training): none lost, none run twice.
    SIGINT to the driver alone takes the same resume path; it is tested on a search
    (tests/test_tune.py::test_resume_after_sigint_keeps_finished_trials_and_finishes_the_rest),
    where the searcher's state must come back too."""
    storage, log = tmp_path / "ray", tmp_path / "driver.log"
    argv = [CLI, "reproduce", "--backbones", "rn50", "--versions", ",".join(KILL_VERSIONS),
            "--data", str(small_data), "--name", "interrupted", "--storage", str(storage),
            "--max-concurrent", "1",
            *[arg for key, value in KILL_OVERRIDES.items() for arg in ("--set", f"{key}={value}")]]
    proc = drivers.start(argv, log)
    try:
        reached = wait_for(lambda: one_trial_done_another_checkpointed(log), 240, proc)
        assert reached, log.read_text()[-4000:]
        _kill_everything(proc)
        assert proc.returncode == -signal.SIGKILL
    finally:
        drivers.kill(proc)
    path = storage / "interrupted"
    before = load_results(path)
    finished = before[before["final"] == 1]
    assert 1 <= len(finished) < len(KILL_VERSIONS), before[["label", "status", "trial_status"]]
    rows_before = {row["trial_id"]: rows_reported(next(path.glob(f"*{row['trial_id']}")))
                   for _, row in finished.iterrows()}

    resume_log = tmp_path / "resume.log"
    resumed = drivers.start([*argv, "--resume"], resume_log)
    try:
        assert resumed.wait(timeout=300) == 0, resume_log.read_text()[-4000:]
    finally:
        drivers.kill(resumed)
    assert "resuming experiment" in resume_log.read_text()
    after = load_results(path)
    baseline = uninterrupted

    # No trial lost or run twice: each label once, every one finished ...
    assert sorted(after["label"]) == sorted(baseline["label"]) == [
        f"rn50-{v}-s0" for v in KILL_VERSIONS]
    assert set(before["trial_id"]) <= set(after["trial_id"]) and after["trial_id"].is_unique
    assert (after["final"] == 1).all(), after[["label", "status", "trial_status"]]
    # ... the trials finished before the kill untouched (same rows, nothing appended) ...
    for trial_id, rows in rows_before.items():
        assert rows_reported(next(path.glob(f"*{trial_id}"))) == rows
    # ... the one that was running continued from its checkpoint, not from epoch 1 ...
    running = before[(before["final"] != 1) & before["training_iteration"].notna()]
    assert len(running) == 1, before[["label", "status", "training_iteration"]]
    resumed_row = after.set_index("trial_id").loc[running["trial_id"].iloc[0]]
    assert resumed_row["iterations_since_restore"] < resumed_row["training_iteration"]
    for trial_id in set(after["trial_id"]) - set(rows_before):
        rows = rows_reported(next(path.glob(f"*{trial_id}")))
        _assert_epochs_continue([r for r in rows if not r["final"]])
    # ... and every result is the uninterrupted run's.
    columns = ["status", "best_epoch", "best_val_rank1", "best_val_mAP", "test_rank1",
               "test_mAP"]
    got = after.set_index("label")[columns].sort_index()
    want = baseline.set_index("label")[columns].sort_index()
    assert got.to_dict("index") == want.to_dict("index")


# ------------------------------------------------------------------------------------------
# Slow: a worker node removed mid-search

NODE_LOSS_SPACE = """
base: {epochs_prompt: 1, epochs_image: 12, early_stop_patience: 0, checkpoint_every: 1,
       checkpoint_min_interval_s: 0}
parameters:
  lr_visual: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  n_ctx: {type: int, low: 2, high: 6}
"""

NODE_LOSS_SCRIPT = """
import glob, json, sys, threading, time
import ray
from ray.cluster_utils import Cluster

from tune_clipfh.tune.experiment import ExperimentOptions
from tune_clipfh.tune.search import search
from tune_clipfh.tune.results import load_results

storage, space, data = sys.argv[1:4]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
removed = {}
try:
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    head_id, worker_id = cluster.head_node.node_id, worker.node_id

    def remove_worker_once_a_trial_checkpointed_there():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not removed:
            for path in glob.glob(f"{storage}/node-loss/*/result.json"):
                with open(path) as handle:
                    rows = [json.loads(line) for line in handle if line.strip()]
                if any(r.get("node_id") == worker_id and r.get("epoch", 0) >= 3 for r in rows):
                    removed["trial_id"] = rows[0]["trial_id"]
                    cluster.remove_node(worker)
                    print(f"REMOVED {worker_id} running {removed['trial_id']}", flush=True)
                    return
            time.sleep(0.2)

    threading.Thread(target=remove_worker_once_a_trial_checkpointed_there, daemon=True).start()
    path = search(space, 3, "rank1", "rn50", None, ExperimentOptions(
        name="node-loss", storage=storage, address=cluster.address, data=data,
        max_concurrent=2, max_failures=3), race_top=0)
    frame = load_results(path)
    histories = {}
    for trial_dir in glob.glob(f"{path}/*/"):
        with open(f"{trial_dir}/result.json") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        histories[rows[0]["trial_id"]] = [(r.get("node_id"), r["epoch"]) for r in rows]
    print("RESULT " + json.dumps({
        "head": head_id, "worker": worker_id, "removed": removed,
        "alive": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
        "trials": frame[["trial_id", "final", "status", "node_id"]].to_dict("records"),
        "histories": histories}), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
def test_trials_of_a_removed_worker_node_are_rescheduled_and_the_search_completes(
        small_data, tmp_path, drivers):
    script = _write(tmp_path / "node_loss.py", NODE_LOSS_SCRIPT)
    space = _write(tmp_path / "space.yaml", NODE_LOSS_SPACE)
    result, text = drivers.run_for_result(
        [sys.executable, str(script), str(tmp_path / "ray"), str(space), str(small_data)],
        tmp_path / "cluster.log", 420, "node-removal run")
    head, worker = result["head"], result["worker"]
    moved = result["removed"].get("trial_id")
    assert moved, f"no trial ran on the worker node:\n{text[-4000:]}"
    assert result["alive"] == [head]
    # Every trial finished, the moved one on the head node after starting on the worker.
    trials = {t["trial_id"]: t for t in result["trials"]}
    assert len(trials) == 3
    assert all(t["final"] == 1 and t["status"] == "completed" for t in trials.values()), trials
    history = result["histories"][moved]  # (node, epoch) of each row
    assert history[0][0] == worker and history[-1][0] == head, history
    assert trials[moved]["node_id"] == head
    # On the head node it went on from its last checkpoint (epoch 3 or later), not from epoch 1.
    first_on_head = next(epoch for node, epoch in history if node == head)
    assert first_on_head > 3, history
    assert all(node in (head, worker) for h in result["histories"].values() for node, _ in h)


# ------------------------------------------------------------------------------------------
# Slow: load, 200 trials

LOAD_SPACE = """
base: {epochs_prompt: 1, epochs_image: 1, early_stop_patience: 0}
parameters:
  lr_visual: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
  n_ctx: {type: int, low: 2, high: 6}
  aug_hflip: {type: float, low: 0.0, high: 0.5}
"""
LOAD_TRIALS = 200
LOAD_WARMUP_TRIALS = 20
LOAD_WINDOW_TRIALS = 20
LOAD_RSS_GROWTH_BOUND_MB = 150
"""Bound on the driver's RSS growth from trials 20-40 to trials 180-200 (the median RSS while
each window's trials finish: the end of the run, when the driver summarises the experiment,
and allocator spikes are not growth; a single-sample peak once read +172 MB where the
steady growth was under half that). The driver legitimately keeps
one Trial object per trial (its config, last result of ~150 metrics and their running
statistics) while Optuna keeps the study in its SQLite file: measured +64 MB over those 180
trials (~0.35 MB each; ~945 MB after 20 trials, torch + Ray + Optuna loaded) on 2 cores.
150 MB (0.8 MB per trial) leaves twice that for allocator noise, while a leak of anything
trial-sized in the driver fails it: one tiny RN50 (18.5 MB of weights) per trial would add
3 GB, a per-trial copy of the decoded store or a model's features likewise."""


def _rss_mb(pid: int) -> float | None:
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@pytest.mark.slow
def test_search_of_200_trials_completes_with_bounded_driver_memory(small_data, tmp_path,
                                                                   drivers):
    space = _write(tmp_path / "space.yaml", LOAD_SPACE)
    storage, log = tmp_path / "ray", tmp_path / "driver.log"
    argv = [CLI, "search", "--space", str(space), "--backbone", "rn50", "--num-samples",
            str(LOAD_TRIALS), "--data", str(small_data), "--storage", str(storage),
            "--name", "load", "--max-concurrent", "2", "--race-top", "0",
            "--max-failures", "0"]
    started = time.monotonic()
    proc = drivers.start(argv, log)
    samples: list[tuple[float, int, float]] = []  # (seconds, trials done, driver RSS MB)
    try:
        while proc.poll() is None and time.monotonic() - started < 540:
            rss = _rss_mb(proc.pid)
            if rss is not None:
                samples.append((time.monotonic() - started, len(tune_lines(log, " done: ")),
                                rss))
            time.sleep(0.5)
        assert proc.wait(timeout=30) == 0, log.read_text()[-4000:]
    finally:
        drivers.kill(proc)
    wall = time.monotonic() - started
    frame = load_results(storage / "load")
    assert len(frame) == LOAD_TRIALS and frame["trial_id"].is_unique
    assert (frame["final"] == 1).all() and (frame["status"] == "completed").all()
    assert frame["test_rank1"].between(0, 1).all()

    def window(first: int) -> list[float]:
        return [rss for _, done, rss in samples if first <= done < first + LOAD_WINDOW_TRIALS]

    early, late = window(LOAD_WARMUP_TRIALS), window(LOAD_TRIALS - LOAD_WINDOW_TRIALS)
    assert len(early) >= 3 and len(late) >= 3, samples
    base, end = statistics.median(early), statistics.median(late)
    report = (f"{LOAD_TRIALS} trials in {wall:.0f}s; driver RSS (median) {base:.0f} MB over "
              f"trials {LOAD_WARMUP_TRIALS}-{LOAD_WARMUP_TRIALS + LOAD_WINDOW_TRIALS}, "
              f"{end:.0f} MB over the last {LOAD_WINDOW_TRIALS} (+{end - base:.0f} MB, bound "
              f"{LOAD_RSS_GROWTH_BOUND_MB} MB); peak {max(s[2] for s in samples):.0f} MB")
    print(report)
    (tmp_path / "load_report.txt").write_text(report + "\n")
    assert end - base < LOAD_RSS_GROWTH_BOUND_MB, report
