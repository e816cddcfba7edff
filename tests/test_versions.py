"""The thesis versions v1-v10 as data: resolved knobs vs a table written from the spec, the
profile overlay, deltas, and one-line errors for bad versions files."""

import json
import os
from pathlib import Path

import pytest
import yaml

import tune_clipfh.resources
from tune_clipfh.config import ConfigError, build_config
from tune_clipfh.tune.versions import (
    VERSIONS_AS_RUN_FILE,
    VERSIONS_FILE,
    format_versions,
    load_versions,
    scaled_to_overlay,
    version_config,
)

REPO = Path(__file__).resolve().parents[1]

# Written from upstream_stage2_spec.md 3.6 / 5.2 / 5.3 (and the thesis remarks), not from the
# YAML: the stated knobs with the correct implementation. Rates are the effective group rates
# (RunConfig.group_lr); "-" is no clipping. Columns:
# run: thesis ran it | opt: optimizer (= prompt_optimizer) | sched, step: stage-2 schedule |
# prompt visual text head: group rates | s m: ArcFace (id_head arcface in every version) |
# tri cen: triplet / center on | cw: center weight | mode blk: unfreeze_mode / _blocks |
# txtfrz: text encoder frozen | clip: max_norm
COLUMNS = ("run opt sched step prompt visual text head s m tri cen cw mode blk txtfrz clip")
EXPECTED = {
    "vitb16": """
        v1  y adam  cosine   epoch 1e-4 1e-4 1e-4 1e-4 30 0.5  y y 5e-4 all    12 n -
        v2  y adamw cosine   batch 1e-4 1e-5 5e-6 1e-4 30 0.5  y y 5e-4 all    12 n -
        v3  y adamw onecycle batch 1e-4 1e-5 5e-6 1e-4 30 0.5  y y 5e-4 all    12 n -
        v4  y adamw onecycle batch 1e-4 1e-5 5e-6 1e-4 30 0.5  n n 5e-4 all    12 n -
        v5  y adamw onecycle batch 1e-4 1e-5 5e-6 1e-4 20 0.3  y y 5e-4 all    12 n -
        v6  y adamw onecycle batch 1e-4 1e-5 5e-6 1e-4 20 0.3  y y 5e-4 last_n 2  y -
        v7  n adamw onecycle batch 1e-4 1e-5 5e-6 1e-4 25 0.35 y y 5e-4 last_n 2  y -
        v8  n adamw cosine   batch 1e-4 1e-5 5e-6 1e-4 30 0.35 y y 5e-4 last_n 12 y 0.5
        v9  y adamw cosine   batch 1e-4 1e-5 5e-6 1e-4 35 0.4  n y 3e-4 last_n 12 y 0.5
        v10 n adamw cosine   batch 1e-4 1e-5 5e-6 1e-4 30 0.4  y y 3e-4 last_n 12 y 0.5
    """,
    "rn50": """
        v1  y adam  cosine   epoch 1e-4 1e-4 1e-4 1e-4 30 0.5  y y 5e-4 all    4 n -
        v2  y adamw cosine   batch 1e-4 1e-4 5e-6 1e-4 30 0.5  y y 5e-4 all    4 n -
        v3  y adamw onecycle batch 1e-4 5e-4 5e-6 1e-4 30 0.5  y y 5e-4 all    4 n -
        v4  y adamw onecycle batch 1e-4 5e-4 5e-6 1e-4 30 0.5  n n 5e-4 all    4 n -
        v5  y adamw onecycle batch 1e-4 5e-4 5e-6 1e-4 20 0.3  y y 5e-4 all    4 n -
        v6  y adamw onecycle batch 1e-4 5e-4 5e-6 1e-4 20 0.3  y y 5e-4 last_n 2 y -
        v7  y adamw onecycle batch 1e-4 5e-4 5e-6 1e-4 25 0.35 y y 5e-4 last_n 2 y -
        v8  y adamw cosine   batch 1e-4 1e-4 5e-6 1e-4 30 0.35 y y 5e-4 last_n 4 y 0.5
        v9  y adamw cosine   batch 1e-4 7e-5 5e-6 1e-4 35 0.4  n y 3e-4 last_n 4 y 0.5
        v10 y adamw cosine   batch 1e-4 7e-5 5e-6 1e-4 30 0.4  y y 3e-4 last_n 4 y 0.5
    """,
}
TINY_OVERLAY = {"profile": ("full", "tiny"), "pretrained": ("openai", "synthetic"),
                "early_stop_patience": (5, 0)}


def _expected_rows(backbone):
    rows = {}
    for line in EXPECTED[backbone].strip().splitlines():
        version, *cells = line.split()
        rows[version] = dict(zip(COLUMNS.split(), cells, strict=True))
    return rows


def _value(cell):
    if cell in ("y", "n"):
        return cell == "y"
    if cell == "-":
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


@pytest.fixture(scope="module")
def full():
    return load_versions()


@pytest.fixture(scope="module")
def tiny():
    return load_versions(profile="tiny")


@pytest.mark.parametrize("backbone", ["vitb16", "rn50"])
def test_versions_match_the_spec_table(full, backbone):
    rows = _expected_rows(backbone)
    assert list(full[backbone]) == list(rows)  # v1..v10, in order
    for version, row in rows.items():
        item = full[backbone][version]
        config = build_config(item.knobs, f"{backbone} {version}").config
        want = {key: _value(cell) for key, cell in row.items()}
        got = {
            "run": item.thesis_run, "opt": config.optimizer, "sched": config.scheduler,
            "step": config.scheduler_step,
            **{group: config.group_lr(group) for group in ("prompt", "visual", "text", "head")},
            "s": config.arcface_scale, "m": config.arcface_margin,
            "tri": config.loss_use_triplet, "cen": config.loss_use_center,
            "cw": config.center_loss_weight, "mode": config.unfreeze_mode,
            "blk": float(config.unfreeze_blocks), "txtfrz": config.freeze_text_encoder,
            "clip": config.max_norm,
        }
        assert got == want, f"{backbone} {version}"
        # spec 5.1 and the knobs every version states alike
        assert config.model == backbone and config.id_head == "arcface"
        assert config.prompt_optimizer == config.optimizer
        assert (config.epochs_prompt, config.epochs_image, config.early_stop_patience,
                config.batch_size, config.n_ctx) == (30, 30, 5, 32, 12)
        assert {config.group_weight_decay(g) for g in ("prompt", "visual", "text", "head")} \
            == {5e-4}
        assert config.prompt_template == "A photo of {ctx}'s {aspect} hand for identification."
        assert (config.profile, config.resolved_pretrained) == ("full", "openai")
        assert config.loss_use_id and config.loss_use_i2t and config.loss_use_supcon
        assert (config.triplet_margin, config.center_lr, config.eta_min) == (0.3, 0.5, 1e-6)
        if config.scheduler == "onecycle":
            assert config.onecycle_pct_start == 0.1


def test_v1_is_one_rate_for_every_group_and_v2_on_has_three(full):
    for backbone in ("vitb16", "rn50"):
        v1 = full[backbone]["v1"].knobs
        assert v1["lr"] == 1e-4
        assert all(v1[f"lr_{g}"] is None for g in ("prompt", "visual", "text", "head"))
        assert v1["prompt_template_list"] is None
        assert len(full[backbone]["v2"].knobs["prompt_template_list"]) == 4


def test_only_vit_v7_v8_v10_were_not_run_by_the_thesis(full):
    not_run = {(b, v) for b, versions in full.items() for v, item in versions.items()
               if not item.thesis_run}
    assert not_run == {("vitb16", "v7"), ("vitb16", "v8"), ("vitb16", "v10")}


def test_tiny_profile_changes_only_the_knobs_it_names(full, tiny):
    for backbone, versions in full.items():
        for version, item in versions.items():
            small = tiny[backbone][version]
            changed = {k: (v, small.knobs[k]) for k, v in item.knobs.items()
                       if small.knobs[k] != v}
            assert changed == TINY_OVERLAY, f"{backbone} {version}"
            assert small.delta == item.delta


def test_shortened_stages_shorten_their_warm_ups(full):
    """8 of the stated 30 image epochs take 5 x 8/30 warm-up epochs, not 5 of 8."""
    from tune_clipfh.tune.experiment import fixed_trials

    short = {"epochs_prompt": 3, "epochs_image": 8}
    for item, knobs in zip(full["rn50"].values(),
                           fixed_trials(["rn50"], None, "full", short), strict=True):
        assert knobs["warmup_epochs"] == pytest.approx(item.knobs["warmup_epochs"] * 8 / 30,
                                                       abs=1e-3)
        assert knobs["prompt_warmup_epochs"] == pytest.approx(
            item.knobs["prompt_warmup_epochs"] * 3 / 30, abs=1e-3)
    assert fixed_trials(["rn50"], ["v1"], "full", short)[0]["warmup_epochs"] > 0


def test_an_overlay_scales_step_milestones_only_under_a_step_schedule():
    values = {"epochs_image": 30, "scheduler": "step", "step_milestones": [10, 20, 25],
              "warmup_epochs": 0.0}
    assert scaled_to_overlay(values, {"epochs_image": 6}) == {"step_milestones": [2, 4, 5]}
    assert scaled_to_overlay({**values, "scheduler": "cosine"}, {"epochs_image": 6}) == {}
    assert scaled_to_overlay(values, {"epochs_image": 6, "step_milestones": [3]}) == {}


def test_tiny_versions_fit_the_tiny_text_tower(tiny):
    from tune_clipfh.model.backbone import create_backbone
    from tune_clipfh.model.prompt import PromptLearner

    for backbone, versions in tiny.items():
        clip = create_backbone(backbone, "tiny", "none")
        prompts = {(v.knobs["n_ctx"], v.knobs["prompt_template"],
                    tuple(v.knobs["prompt_template_list"] or ())) for v in versions.values()}
        for n_ctx, template, templates in prompts:
            PromptLearner(clip, 2, n_ctx=n_ctx, template=template, templates=list(templates),
                          aspect="palmar_r")  # raises when a template does not fit


def test_deltas_name_exactly_what_changed(full):
    assert full["vitb16"]["v1"].delta == {}
    assert full["vitb16"]["v4"].delta == {"loss_use_triplet": (True, False),
                                          "loss_use_center": (True, False)}
    assert full["vitb16"]["v9"].delta == {"arcface_scale": (30.0, 35.0),
                                          "arcface_margin": (0.35, 0.4),
                                          "loss_use_triplet": (True, False),
                                          "center_loss_weight": (5e-4, 3e-4)}
    # OneCycle's own rise replaces the correct mode's linear warm-up
    assert full["rn50"]["v3"].delta == {"scheduler": ("cosine", "onecycle"),
                                        "lr_visual": (1e-4, 5e-4), "warmup_epochs": (5.0, 0.0)}
    assert full["rn50"]["v6"].delta == {"unfreeze_mode": ("all", "last_n"),
                                        "unfreeze_blocks": (4, 2),
                                        "freeze_text_encoder": (False, True)}


def test_version_config_applies_overrides_last():
    config = version_config("rn50", "v9", overrides={"seed": 3, "data_dir": "data/x",
                                                     "id_head": "linear"})
    assert (config.model, config.lr_visual, config.seed, config.data_dir) == \
        ("rn50", 7e-5, 3, "data/x")
    assert config.id_head == "linear" and not config.use_arcface
    assert version_config("vitb16", "v5", profile="tiny").profile == "tiny"
    with pytest.raises(ConfigError, match=r"version 'v11' is not defined .*\(defined: v1, v2"):
        version_config("vitb16", "v11")
    with pytest.raises(ConfigError, match="key 'sed': unknown key \\(did you mean 'seed'\\?\\)"):
        version_config("vitb16", "v1", overrides={"sed": 1})


def test_formats(full):
    items = list(full["vitb16"].values()) + [full["rn50"]["v4"]]
    table = format_versions(items)
    assert "vitb16: 10 version(s), profile full" in table and "rn50: 1 version(s)" in table
    assert "changes vs previous:" in table
    assert "loss_use_triplet true -> false; loss_use_center true -> false" in table
    header = next(line for line in table.splitlines() if line.startswith("knob"))
    assert header.split() == ["knob"] + [f"v{i}" for i in range(1, 11)]
    as_yaml = yaml.safe_load(format_versions(items, "yaml"))
    assert as_yaml["vitb16"]["v4"]["delta"] == {"loss_use_triplet": [True, False],
                                                "loss_use_center": [True, False]}
    assert as_yaml["rn50"]["v4"]["knobs"]["lr_visual"] == 5e-4
    as_json = json.loads(format_versions(items, "json"))
    assert as_json["vitb16"]["v8"]["thesis_run"] is False
    assert as_json["vitb16"]["v8"]["knobs"] == full["vitb16"]["v8"].knobs
    with pytest.raises(ConfigError, match="valid: table, yaml, json"):
        format_versions(items, "csv")


def test_default_files_are_the_shipped_ones_and_the_checkout_links_to_them():
    """Read from the package (so a wheel has them); search_spaces/ of a checkout is the same
    file, not a copy (tests/test_packaging.py checks every shipped file)."""
    shipped = Path(tune_clipfh.resources.__file__).parent / "search_spaces"
    for path in (VERSIONS_FILE, VERSIONS_AS_RUN_FILE):
        assert path.is_file() and path.parent == shipped
        assert os.path.samefile(path, REPO / "search_spaces" / path.name)


# ------------------------------------------------------------------------------------------
# Errors: one line, naming the file, the backbone/version and what is valid

GOOD = {"thesis_run": True, "note": "stated change"}


def _write(tmp_path, backbones, profiles=None, text=None):
    path = tmp_path / "versions.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(
        {"common": {"epochs_prompt": 1, "epochs_image": 1},
         "profiles": profiles or {"full": {}, "tiny": {"profile": "tiny"}},
         "backbones": backbones}))
    return path


@pytest.mark.parametrize("backbones, message", [
    ({"vitb16": {"v1": GOOD, "v2": {**GOOD, "inherits": "v0"}}},
     "[vitb16 v2]: inherits 'v0', which is not defined (defined: v1, v2)"),
    ({"vitb16": {"v1": {**GOOD, "inherits": "v2"}, "v2": {**GOOD, "inherits": "v1"}}},
     "[vitb16 v1]: inheritance cycle v1 -> v2 -> v1"),
    ({"rn50": {"v1": {**GOOD, "set": {"unfreez_blocks": 2}}}},
     "[rn50 v1]: key 'unfreez_blocks': unknown key (did you mean 'unfreeze_blocks'?)"),
    ({"rn50": {"v1": {**GOOD, "set": {"unfreeze_blocks": 2}},
               "v2": {**GOOD, "inherits": "v1", "set": {"unfreeze_blocks": 12}}}},
     "[rn50 v2]: key 'unfreeze_blocks': 12 is out of range for model rn50"),
    ({"rn50": {"v1": {**GOOD, "set": {"model": "vitb16"}}}},
     "[rn50 v1]: key 'model' cannot be set here: the backbone section names the model"),
    ({"vitb61": {"v1": GOOD}},  # (valid: ...) lists every registered backbone
     "[vitb61]: unknown backbone (did you mean 'vitb16'?) (valid: vitb16, rn50"),
    ({"vitb16": {"v1": {**GOOD, "notes": "x"}}},
     "[vitb16 v1]: unknown entry key 'notes' (did you mean 'note'?)"),
    ({"vitb16": {"v1": {"note": "x"}}}, "[vitb16 v1]: 'thesis_run' must be true or false"),
])
def test_bad_versions_files_give_one_line_errors(tmp_path, backbones, message):
    path = _write(tmp_path, backbones)
    with pytest.raises(ConfigError) as error:
        load_versions(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_section_is_the_check_search_spaces_share(tmp_path):
    path = _write(tmp_path, {}, text="comon: {epochs_image: 1}\nbackbones: {}\n")
    with pytest.raises(ConfigError) as error:
        load_versions(path)
    assert str(error.value) == (f"{path}: section 'comon' is not valid (did you mean "
                                f"'common'?) (valid: extends, common, correct_mode, profiles, backbones)")


def test_unknown_profile_and_malformed_yaml(tmp_path):
    path = _write(tmp_path, {"vitb16": {"v1": GOOD}})
    with pytest.raises(ConfigError, match=r"profile 'tinny' is not defined \(did you mean "
                                          r"'tiny'\?\) \(valid: full, tiny\)"):
        load_versions(path, profile="tinny")
    bad = _write(tmp_path, {}, text="backbones:\n  vitb16: [v1\n")
    with pytest.raises(ConfigError, match="malformed YAML") as error:
        load_versions(bad)
    assert str(error.value).startswith(str(bad)) and "\n" not in str(error.value)


def test_correct_mode_adds_the_b8_warm_up_where_a_version_does_not_state_one():
    """Spec B8's fix adds a warm-up; OneCycle versions rise by themselves; as-run undoes it."""
    stated = load_versions()["rn50"]
    assert stated["v1"].correct_mode == {"prompt_warmup_epochs": 1.0, "warmup_epochs": 5.0}
    assert stated["v1"].knobs["warmup_epochs"] == 5.0
    assert stated["v3"].knobs["scheduler"] == "onecycle"
    assert stated["v3"].correct_mode == {"prompt_warmup_epochs": 1.0}
    assert stated["v3"].knobs["warmup_epochs"] == 0.0
    assert "prompt_warmup_epochs" not in stated["v1"].stated  # an addition, not stated
    as_run = load_versions(VERSIONS_AS_RUN_FILE)["rn50"]
    assert all(v.correct_mode == {} for v in as_run.values())
    assert all(v.knobs["warmup_epochs"] == 0.0 == v.knobs["prompt_warmup_epochs"]
               for v in as_run.values())
    table = format_versions(list(stated.values()))
    assert "the correct mode adds" in table and "warmup_epochs 5" in table
