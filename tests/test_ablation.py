"""The path ablation (``ablate --toward``): its trials from a version toward a config file, one
knob group at a time; the knob-groups file; the table read back; the CLI; one tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tune_clipfh.cli import build_parser, main
from tune_clipfh.config import ConfigError, build_config
from tune_clipfh.errors import UserError
from tune_clipfh.report.claims import BEYOND, UNKNOWN, WITHIN
from tune_clipfh.resources import resource_path
from tune_clipfh.tune.ablation import (
    RUN_KNOBS,
    ablate_toward,
    ablation_summary,
    ablation_table,
    format_ablation_table,
    load_knob_groups,
    path_ablation_trials,
    start_knobs,
)
from tune_clipfh.tune.experiment import ExperimentOptions
from tune_clipfh.tune.results import experiment_meta, load_results
from tune_clipfh.tune.trainable import META_KEYS
from tune_clipfh.tune.versions import load_versions

TINY = resource_path("configs", "tiny_synthetic.yaml")
# v5 (rn50, tiny profile) against tiny_synthetic.yaml: every group of knob_groups.yaml differs
GROUPS = ["image_epochs", "id_head", "schedule", "center", "lr_head", "prompt_stage",
          "prompt_form", "text_encoder", "augmentation", "visual_decay"]
QUICK = {"epochs_prompt": 1, "epochs_image": 2, "limit_train_batches": 2}


def _knobs(trial: dict) -> dict:
    return {key: value for key, value in trial.items() if key not in META_KEYS}


def _differing(a: dict, b: dict) -> set[str]:
    return {key for key in a if key != "experiment" and a[key] != b[key]}


def _toward_v5(tmp_path: Path, name: str = "toward", **changes) -> Path:
    """A config file with rn50 v5's knobs (tiny profile) and ``changes``."""
    knobs = {**load_versions(profile="tiny")["rn50"]["v5"].knobs, **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(knobs))
    return path


def test_forward_steps_take_one_group_from_the_end():
    trials = path_ablation_trials("rn50", "v5", TINY, "tiny", direction="forward")
    assert [t["version"] for t in trials] == ["v5", "tiny_synthetic",
                                              *(f"v5+{group}" for group in GROUPS)]
    start, end = _knobs(trials[0]), _knobs(trials[1])
    groups = {group.name: set(group.knobs) for group in load_knob_groups()}
    for trial in trials[2:]:
        group = trial["version"].removeprefix("v5+")
        changed = _differing(_knobs(trial), start)
        assert changed and changed <= groups[group], group
        assert changed == _differing(start, end) & groups[group]
        assert all(trial[key] == end[key] for key in changed)


def test_backward_steps_put_one_group_of_the_start_back():
    trials = path_ablation_trials("rn50", "v5", TINY, "tiny", direction="backward")
    assert [t["version"] for t in trials[2:]] == [f"tiny_synthetic-{g}" for g in GROUPS]
    start, end = _knobs(trials[0]), _knobs(trials[1])
    groups = {group.name: set(group.knobs) for group in load_knob_groups()}
    for trial in trials[2:]:
        group = trial["version"].removeprefix("tiny_synthetic-")
        changed = _differing(_knobs(trial), end)
        assert changed == _differing(start, end) & groups[group], group
        assert all(trial[key] == start[key] for key in changed)


def test_both_directions_and_the_trials_shape():
    trials = path_ablation_trials("rn50", "v5", TINY, "tiny")
    assert len(trials) == 2 + 2 * len(GROUPS)
    start = start_knobs("rn50", "v5", "tiny", {})
    for trial in trials:
        label = trial["version"]
        assert {k: trial[k] for k in ("backbone", "kind", "behaviour", "thesis_run")} == \
            {"backbone": "rn50", "kind": "fixed", "behaviour": "correct", "thesis_run": False}
        assert trial["experiment"] == f"rn50-{label}"
        # the run's own settings are the start's in every trial
        assert all(trial[k] == start[k] for k in RUN_KNOBS if k != "experiment"), label
        build_config(_knobs(trial), label)
    assert _knobs(trials[0]) == start


def test_grouped_knobs_change_together():
    trials = {t["version"]: t for t in path_ablation_trials("rn50", "v5", TINY, "tiny")}
    start, end = trials["v5"], trials["tiny_synthetic"]
    step = trials["v5+id_head"]
    assert (start["id_head"], end["id_head"]) == ("arcface", "linear")
    for key in ("id_head", "use_arcface", "loss_use_arcface", "arcface_scale", "arcface_margin"):
        assert step[key] == end[key] != start[key], key
    assert step["scheduler"] == start["scheduler"] != end["scheduler"]


def test_a_knob_in_no_group_is_a_step_of_its_own(tmp_path):
    toward = _toward_v5(tmp_path, aug_pad_crop=4, label_smoothing=0.2)
    trials = path_ablation_trials("rn50", "v5", toward, "tiny")
    assert [t["version"] for t in trials] == [
        "v5", "toward", "v5+augmentation", "v5+label_smoothing", "toward-augmentation",
        "toward-label_smoothing"]
    own = trials[3]
    assert (own["label_smoothing"], own["aug_pad_crop"]) == (0.2, trials[0]["aug_pad_crop"])


def test_identical_configurations_give_no_steps(tmp_path):
    trials = path_ablation_trials("rn50", "v5", _toward_v5(tmp_path, name="same"), "tiny")
    assert [t["version"] for t in trials] == ["v5", "same"]


def test_the_runs_overrides_apply_to_both_ends():
    trials = path_ablation_trials("rn50", "v5", TINY, "tiny", {"epochs_image": 4})
    assert trials[0]["epochs_image"] == trials[1]["epochs_image"] == 4
    assert "v5+image_epochs" not in [t["version"] for t in trials]


@pytest.mark.parametrize("call, message", [
    (lambda tmp: path_ablation_trials("vitb16", "v5", TINY, "tiny"),
     "tiny_synthetic.yaml: key 'model': rn50 is not the ablated model vitb16"),
    (lambda tmp: path_ablation_trials("rn50", "v5", TINY, "full"),
     "tiny_synthetic.yaml: key 'profile': tiny is not the ablated profile full"),
    (lambda tmp: path_ablation_trials("rn50", "v5", tmp / "missing.yaml", "tiny"),
     "--toward .*missing.yaml: file not found"),
    (lambda tmp: path_ablation_trials("rn50", "v99", TINY, "tiny"),
     "--versions: 'v99' is not defined for rn50"),
    (lambda tmp: path_ablation_trials("rn50", "v5", TINY, "tiny", direction="sideways"),
     "--direction: 'sideways' is not valid"),
])
def test_errors_are_one_line(tmp_path, call, message):
    with pytest.raises(UserError, match=message) as caught:
        call(tmp_path)
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------
# The knob-groups file


def test_the_shipped_knob_groups():
    groups = load_knob_groups()
    assert [group.name for group in groups] == GROUPS
    assert groups[1].knobs == ("id_head", "use_arcface", "loss_use_arcface", "arcface_scale",
                               "arcface_margin")
    assert all(group.why and "\n" not in group.why for group in groups)


@pytest.mark.parametrize("text, message", [
    ("groups:\n  lr:\n    knobs: [lr_hed]\n    why: rates\n",
     "group 'lr': knob 'lr_hed': not a configuration key \\(did you mean 'lr_head'\\?\\)"),
    ("groups:\n  lr:\n    knobs: [lr]\n    wy: rates\n", "group 'lr': unknown key 'wy'"),
    ("groups:\n  2lr:\n    knobs: [lr]\n    why: rates\n", "group '2lr': not a valid name"),
    ("groups:\n  a:\n    knobs: [lr]\n    why: x\n  b:\n    knobs: [lr]\n    why: y\n",
     "group 'b': knob 'lr' is already in group 'a'"),
    ("groups:\n  run:\n    knobs: [seed]\n    why: x\n",
     "group 'run': knob 'seed' describes the run"),
    ("groups:\n  lr:\n    knobs: []\n    why: x\n", "group 'lr': 'knobs' must be a non-empty"),
    ("group: {}\n", "section 'group' is not valid"),
])
def test_knob_groups_file_errors_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "groups.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{path}: {message}") as caught:
        load_knob_groups(path)
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------
# The table


def _results() -> pd.DataFrame:
    """Trials as load_results gives them, in no particular order."""
    rows = [("toward-a", 0, 0.50, 0.60), ("toward-a", 1, math.nan, math.nan),  # stopped
            ("v5", 0, 0.40, 0.50), ("v5+a", 0, 0.50, 0.60), ("toward", 0, 0.41, 0.51),
            ("v5", 1, 0.42, 0.52), ("v5+a", 1, 0.52, 0.62), ("toward", 1, 0.43, 0.53),
            ("v5", 2, 0.44, 0.54), ("v5+a", 2, 0.54, 0.64), ("toward", 2, 0.45, 0.55),
            ("toward-b", 0, math.nan, math.nan)]
    return pd.DataFrame(rows, columns=["config/version", "seed", "test_rank1", "test_mAP"])


def test_ablation_table_compares_each_step_with_the_start():
    table = ablation_table(_results(), "v5")
    assert list(table["label"]) == ["v5", "v5+a", "toward", "toward-a"]
    assert list(table["step"]) == ["start", "forward", "end", "backward"]
    assert list(table["changes"]) == ["", "a", "every group", "a"]
    assert list(table["seeds"]) == [3, 3, 3, 1]
    assert table["rank1"].tolist() == pytest.approx([42.0, 52.0, 43.0, 50.0])
    assert table["rank1_std"].tolist()[:3] == pytest.approx([2.0, 2.0, 2.0])
    assert math.isnan(table["rank1_std"].iloc[3])
    assert table["mAP"].tolist() == pytest.approx([52.0, 62.0, 53.0, 60.0])
    assert math.isnan(table["delta"].iloc[0]) and table["verdict"].iloc[0] == ""
    assert table["delta"].tolist()[1:] == pytest.approx([10.0, 1.0, 8.0])
    assert table["noise"].tolist()[1:3] == pytest.approx([math.sqrt(8)] * 2)
    assert math.isnan(table["noise"].iloc[3])
    assert table["verdict"].tolist()[1:] == [BEYOND, WITHIN, UNKNOWN]

    text = format_ablation_table(table, "v5")
    assert "| forward | v5+a | a | 3 | 52.0 | 2.0 | 62.0 | +10.0 | 2.8 | " \
           "beyond the seed noise |" in text
    assert "| start | v5 |  | 3 | 42.0 | 2.0 | 52.0 |  |  |  |" in text


def test_ablation_table_needs_the_start_with_test_results():
    frame = _results()
    with pytest.raises(UserError, match="the start v5 has no trial with test results"):
        ablation_table(frame[frame["config/version"] != "v5"], "v5")


# ------------------------------------------------------------------------------------------
# The command line


def test_cli_parses_toward_direction_and_summary():
    parser = build_parser()
    args = parser.parse_args(["ablate", "--backbone", "rn50", "--toward", "configs/x.yaml",
                              "--direction", "forward", "--seeds", "3"])
    assert (args.backbone, args.toward, args.direction, args.seeds, args.summary) == \
        ("rn50", "configs/x.yaml", "forward", 3, None)
    args = parser.parse_args(["ablate"])
    assert (args.toward, args.direction, args.summary) == (None, None, None)
    assert parser.parse_args(["ablate", "--summary", "runs/x"]).summary == "runs/x"


@pytest.mark.parametrize("argv, message", [
    (["--summary", "x", "--toward", "y.yaml"], "--summary prints the table"),
    (["--summary", "x", "--direction", "forward"], "--summary prints the table"),
    (["--direction", "forward"], "--direction needs --toward"),
    (["--summary", "{tmp}"], "--summary {tmp}: not a path ablation"),
    (["--summary", "{tmp}/none"], "--summary {tmp}/none: folder does not exist"),
    (["--backbone", "rn50", "--toward", "{tmp}/none.yaml"], "--toward {tmp}/none.yaml: file"),
])
def test_cli_misuse_is_one_error_line(tmp_path, capsys, argv, message):
    assert main(["ablate", *(a.format(tmp=tmp_path) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message.format(tmp=tmp_path)}") and err.count("\n") == 1


# ------------------------------------------------------------------------------------------
# One tiny run


def test_ablate_toward_runs_the_path_and_prints_its_table(ray_session, tmp_path, capsys):
    toward = _toward_v5(tmp_path, name="padded", aug_pad_crop=4)
    options = ExperimentOptions(name="path", storage=str(tmp_path / "ray"), overrides=QUICK)
    path = ablate_toward("rn50", "v5", toward, options, direction="forward")
    assert {"ablation": "path", "toward": str(toward), "direction": "forward",
            "versions": ["v5"]}.items() <= experiment_meta(path).items()
    frame = load_results(path).set_index("config/version")
    assert sorted(frame.index) == ["padded", "v5", "v5+augmentation"]
    assert frame["test_rank1"].notna().all()
    # the one step is the end itself: the same configuration and seed, the same result
    assert frame.loc["v5+augmentation", "test_rank1"] == frame.loc["padded", "test_rank1"]
    capsys.readouterr()  # Tune's own progress output
    assert main(["ablate", "--summary", str(path)]) == 0
    printed = capsys.readouterr().out
    assert printed == ablation_summary(path) + "\n"
    assert "| forward | v5+augmentation | augmentation | 1 |" in printed
