"""The run-config schema: round trips, upstream files, and one-line errors for bad input."""

import math
from pathlib import Path

import pytest
import yaml

from tune_clipfh.cli import main
from tune_clipfh.config import ConfigError, RunConfig, build_config, load_config, read_yaml
from tune_clipfh.model.registry import BACKBONES

UPSTREAM_FILES = ["configs/vitb16_11k_dorsal_r.yaml", "configs/rn50_11k_dorsal_r.yaml"]


def test_defaults_are_valid_and_round_trip(tmp_path):
    config = build_config({}).config
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    again = load_config(path).config
    assert again == config


@pytest.mark.parametrize("path", UPSTREAM_FILES)
def test_upstream_format_loads_as_is_and_reports_ignored_keys(path):
    loaded = load_config(path)
    ignored = {note.split("'")[1] for note in loaded.notes if "accepted and ignored" in note}
    assert {"loss_list", "shuffle", "pin_memory", "num_workers", "input_size", "save_dir",
            "log_dir"} <= ignored
    config = loaded.config
    # Upstream '{}' becomes our explicit context placeholder; ArcFace flags select the head.
    assert config.prompt_template == "A photo of {ctx}'s {aspect} hand for identification."
    assert config.id_head == "arcface" and config.loss_use_arcface
    assert isinstance(config.lr_visual, float)  # "1e-5" is a string to YAML 1.1


FIXTURES = Path(__file__).parent / "fixtures" / "upstream"
VERBATIM = {  # the upstream files as committed (tests/fixtures/upstream/README.md)
    "vitb16": FIXTURES / "train_joint_vitb16_11k_dorsal_r.yml",
    "rn50": FIXTURES / "train_joint_rn50_11k_dorsal_r.yml",
}
UPSTREAM_VALUES = {
    "rn50": {  # v10, the RN50 file at upstream HEAD
        "experiment": "stage2_clipreid", "model": "rn50", "dataset": "11k",
        "aspect": "dorsal_r", "n_ctx": 12, "ctx_init": None, "freeze_prompt": False,
        "freeze_text_encoder": True, "stage_mode": "prompt_then_image", "epochs_prompt": 30,
        "epochs_image": 30, "early_stop_patience": 5, "lr": 1e-5, "weight_decay": 5e-4,
        "center_lr": 0.5, "center_loss_weight": 3e-4, "id_head": "arcface",
        "arcface_scale": 30.0, "arcface_margin": 0.4, "lr_visual": 7e-5, "lr_prompt": 1e-4,
        "lr_text": 5e-6, "weight_decay_prompt": 5e-4, "weight_decay_visual": 5e-4,
        "weight_decay_text": 5e-4, "loss_use_supcon": True, "loss_use_triplet": True,
        "loss_use_center": True, "loss_use_id": True, "unfreeze_blocks": 4, "batch_size": 32,
        "output_dir": "train_logs/",
        "prompt_template": "A photo of {ctx}'s {aspect} hand for identification.",
        "prompt_template_list": ["A photo of a {ctx} hand.", "A close-up of the {ctx} of a person.",
                                 "{ctx} hand image.", "An image showing a {ctx}."],
    },
    "vitb16": {  # an April state of the ViT file
        "experiment": "stage2_joint_vitb16_11k_dorsal_r", "model": "vitb16", "n_ctx": 8,
        "ctx_init": None, "freeze_prompt": False, "freeze_text_encoder": True,
        "epochs_prompt": 10, "epochs_image": 10, "lr": 1e-4, "weight_decay": 5e-4,
        "center_lr": 0.5, "center_loss_weight": 5e-4, "id_head": "arcface",
        "arcface_scale": 30.0, "arcface_margin": 0.5, "batch_size": 32,
        "prompt_template": "A photo of {ctx}'s {aspect} hand for identification.",
        "prompt_template_list": None,
    },
}


def test_upstream_fixtures_keep_upstream_yaml_forms():
    rn50 = read_yaml(VERBATIM["rn50"])
    assert rn50["lr"] == "1e-5"  # YAML 1.1: a string, as upstream's loader saw it
    assert rn50["arcface_scale"] == 30 and isinstance(rn50["arcface_scale"], int)
    assert rn50["prompt_template_list"][0] == "A photo of a X X X X hand."
    assert "weight_decay" not in rn50  # commented out upstream
    assert read_yaml(VERBATIM["vitb16"])["ctx_init"] == "a hand"


@pytest.mark.parametrize("backbone", sorted(VERBATIM))
def test_upstream_files_load_verbatim_with_upstream_values(backbone):
    loaded = load_config(VERBATIM[backbone])
    config, notes = loaded.config, loaded.notes
    for key, value in UPSTREAM_VALUES[backbone].items():
        assert getattr(config, key) == pytest.approx(value) if isinstance(value, float) \
            else getattr(config, key) == value, key
    assert isinstance(config.lr, float)
    assert config.use_arcface and config.loss_use_arcface
    ignored = {note.split("'")[1] for note in notes if "accepted and ignored" in note}
    expected = {"loss_list", "shuffle", "pin_memory", "num_workers", "save_dir"}
    expected |= {"log_dir"} if backbone == "rn50" else {"ctx_init"}
    assert ignored == expected
    assert all(note.startswith(f"{VERBATIM[backbone]}: ") and "\n" not in note for note in notes)
    assert any("'prompt_template': upstream's '{}' read as" in note for note in notes)


def test_upstream_template_list_is_translated_and_noted():
    notes = load_config(VERBATIM["rn50"]).notes
    assert any("'prompt_template_list': upstream's 'X X X X' and '{}' read as the identity "
               "context placeholder {ctx}" in note for note in notes)
    assert any("'prompt_template_list': upstream's list had no effect in any run" in note
               for note in notes)


def test_upstream_ctx_init_that_cannot_fill_n_ctx_is_ignored_with_its_reason():
    notes = load_config(VERBATIM["vitb16"]).notes
    assert any("'ctx_init' 'a hand' accepted and ignored: upstream never used it" in note
               and "n_ctx 8" in note for note in notes)
    kept = build_config({"n_ctx": 2, "ctx_init": "a hand"})
    assert kept.config.ctx_init == "a hand" and kept.notes == []


@pytest.mark.parametrize("template, expected", [
    ("A photo of a X X X X hand.", "A photo of a {ctx} hand."),
    ("X hand image.", "{ctx} hand image."),
    ("A photo of a {ctx} X hand.", "A photo of a {ctx} X hand."),  # ours: left alone
])
def test_run_of_xs_reads_as_the_context_placeholder(template, expected):
    assert build_config({"prompt_template": template}).config.prompt_template == expected


@pytest.mark.parametrize("template", ["A X X photo of X X hands.", "An X-ray of a hand.",
                                      "A photo of XX hands."])
def test_templates_without_one_clear_placeholder_are_still_refused(template):
    with pytest.raises(ConfigError, match="key 'prompt_template_list': .* must contain"):
        build_config({"prompt_template_list": [template]})


def test_cli_config_check_accepts_the_verbatim_upstream_files(capsys):
    for backbone, path in VERBATIM.items():
        assert main(["config", "check", str(path)]) == 0
        captured = capsys.readouterr()
        assert yaml.safe_load(captured.out)["model"] == backbone
        assert captured.err.strip().splitlines()[-1] == f"# {path}: valid"


def test_set_overrides_apply_with_yaml_scalars():
    config = load_config("configs/tiny_synthetic.yaml",
                         ["lr_visual=2e-5", "loss_use_center=true", "ctx_init=null"]).config
    assert config.lr_visual == 2e-5 and config.loss_use_center and config.ctx_init is None


def test_group_rates_fall_back_to_lr():
    config = build_config({"lr": 3e-4, "lr_visual": 1e-5}).config
    assert config.group_lr("visual") == 1e-5
    assert config.group_lr("text") == 3e-4
    assert config.group_weight_decay("head") == config.weight_decay


@pytest.mark.parametrize("model", list(BACKBONES))
def test_the_tiny_profile_scales_only_the_pretrained_towers_rates(model):
    stated = {"model": model, "lr": 3e-4, "lr_visual": 1e-5, "lr_prompt": 5e-3, "lr_head": 1e-3}
    full = build_config({**stated, "profile": "full"}).config
    tiny = build_config({**stated, "profile": "tiny"}).config
    scale = BACKBONES[model].tiny_lr_scale
    assert scale > 1  # narrow towers have larger weights: a step moves them less, relatively
    assert tiny.group_lr("visual") == pytest.approx(1e-5 * scale)
    assert tiny.group_lr("text") == pytest.approx(3e-4 * scale)
    for group in ("prompt", "head"):  # trained from scratch in both profiles
        assert tiny.group_lr(group) == full.group_lr(group)
    assert full.group_lr("visual") == 1e-5 and tiny.lr_visual == 1e-5  # the config keeps it


def test_auto_weights_are_openai_for_full_and_synthetic_for_tiny():
    assert build_config({"profile": "full"}).config.resolved_pretrained == "openai"
    assert build_config({"profile": "tiny"}).config.resolved_pretrained == "synthetic"


@pytest.mark.parametrize("values, message", [
    ({"unfreez_blocks": 2}, "key 'unfreez_blocks': unknown key (did you mean 'unfreeze_blocks'?)"),
    ({"unfreeze_blocks": 13}, "key 'unfreeze_blocks': 13 is out of range for model vitb16, "
                              "whose image tower has 12 blocks (valid: 0..12)"),
    ({"model": "rn50", "unfreeze_blocks": 5}, "whose image tower has 4 blocks (valid: 0..4)"),
    ({"lr_visual": -1e-5}, "key 'lr_visual': -1e-05 is out of range (valid: (0, 10])"),
    ({"arcface_margin": math.pi / 2}, "key 'arcface_margin': 1.5707963267948966 is out of "
                                      "range (valid: [0, pi/2))"),
    ({"arcface_margin": -0.1}, "key 'arcface_margin': -0.1 is out of range"),
    ({"n_ctx": "four"}, "key 'n_ctx': expected an integer, got 'four'"),
    ({"loss_use_triplet": "yes please"}, "key 'loss_use_triplet': expected true or false"),
    ({"model": "vit"}, "key 'model': 'vit' is not valid (valid: vitb16, rn50"),  # + registry
    ({"batch_size": 30, "pk_k": 4}, "key 'pk_k': P x K sampling needs batch_size divisible by "
                                    "pk_k (batch_size 30, pk_k 4)"),
    ({"stage_mode": "prompt_only", "epochs_prompt": 0}, "key 'epochs_prompt': stage_mode "
                                                        "prompt_only runs the prompt stage"),
    ({"loss_use_id": False, "loss_use_triplet": False, "loss_use_center": False,
      "loss_use_i2t": False}, "every image-stage loss is off"),
    ({"prompt_template": "a hand"}, "key 'prompt_template': 'a hand' must contain"),
    ({"use_arcface": True, "loss_use_arcface": False}, "contradicts"),
    ({"profile": "tiny", "pretrained": "openai"},
     "key 'pretrained': openai weights exist only for the full profile"),
])
def test_bad_values_give_one_line_errors_naming_the_key(values, message):
    with pytest.raises(ConfigError) as info:
        build_config(values, "my.yaml")
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("my.yaml")
    assert message in text


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: vitb16\nlr: [1e-4\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+: malformed YAML"):
        read_yaml(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        read_yaml(path)


def test_unknown_override_key_is_refused():
    with pytest.raises(ConfigError, match="--set: key 'seeed': unknown key .*'seed'"):
        load_config(None, ["seeed=1"])


def test_cli_config_check_accepts_upstream_and_refuses_bad_input(tmp_path, capsys):
    assert main(["config", "check", UPSTREAM_FILES[0]]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["unfreeze_blocks"] == 12 and printed["id_head"] == "arcface"

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: vitb16\nunfreeze_blocks: 13\n")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad}: key 'unfreeze_blocks': 13 is out of range for model vitb16, "
                   "whose image tower has 12 blocks (valid: 0..12)"]
    assert main(["config", "check", UPSTREAM_FILES[0], "--set", "lr=-1"]) == 2
    assert "key 'lr': -1.0 is out of range" in capsys.readouterr().err


def test_every_field_is_documented():
    import dataclasses

    for f in dataclasses.fields(RunConfig):
        assert f.metadata.get("help"), f.name


SEED_FILES = FIXTURES / "d0f5b4b" / "configs"  # all eight Stage-2 files at upstream d0f5b4b
OTHER_SCRIPTS_IGNORED = {  # per file: the keys reported as ignored (README of the fixtures)
    "train_stage2_clip_reid/train_joint_vitb16_11k_dorsal_r.yml":
        {"loss_list", "num_workers", "shuffle", "pin_memory", "save_dir", "log_dir"},
    "train_stage2_clip_reid/train_joint_rn50_11k_dorsal_r.yml":
        {"loss_list", "num_workers", "shuffle", "pin_memory", "save_dir", "log_dir"},
    "archived/train_stage2_loss_variants/train_vitb16_11k_dorsal_r_ce.yml": set(),
    "archived/train_stage2_loss_variants/train_vitb16_11k_dorsal_r_ce_arcface.yml": set(),
    "archived/train_stage2_loss_variants/train_vitb16_11k_dorsal_r_ce_triplet.yml":
        {"loss", "save_path", "log_path"},
    "archived/train_stage2_loss_variants/train_vitb16_11k_dorsal_r_ce_triplet_center.yml":
        {"loss", "save_path", "log_path"},
    "eval_stage2_clip_reid/eval_joint_vitb16_11k_dorsal_r.yml": {"num_workers", "model_path"},
    "eval_stage2_clip_reid/eval_vitb16_11k_dorsal_r.yml": {"num_workers", "model_path"},
}


def test_the_seed_fixtures_are_its_eight_stage2_files():
    found = {str(p.relative_to(SEED_FILES)) for p in SEED_FILES.rglob("*.yml")}
    assert found == set(OTHER_SCRIPTS_IGNORED)
    sizes = {p.name: p.stat().st_size for p in SEED_FILES.rglob("*_ce*.yml")}
    assert sizes["train_vitb16_11k_dorsal_r_ce.yml"] == 0  # empty upstream, kept empty
    assert sizes["train_vitb16_11k_dorsal_r_ce_arcface.yml"] == 1  # one newline


@pytest.mark.parametrize("name", sorted(OTHER_SCRIPTS_IGNORED))
def test_every_seed_stage2_file_loads_with_each_ignored_key_reported(name):
    loaded = load_config(SEED_FILES / name)
    ignored = {note.split("'")[1]: note for note in loaded.notes
               if "accepted and ignored: " in note}
    assert set(ignored) == OTHER_SCRIPTS_IGNORED[name]
    assert all(note.split("accepted and ignored: ")[1].strip() for note in ignored.values())
    if not read_yaml(SEED_FILES / name):
        assert loaded.notes == [f"{SEED_FILES / name}: holds no keys; every knob takes its "
                                f"default"]
        assert loaded.config == build_config({}).config


@pytest.mark.parametrize("name, epochs", [("train_vitb16_11k_dorsal_r_ce_triplet.yml", 1),
                                          ("train_vitb16_11k_dorsal_r_ce_triplet_center.yml", 50)])
def test_archived_epochs_mean_the_image_stage_of_upstreams_loss_variant_trainer(name, epochs):
    loaded = load_config(SEED_FILES / "archived" / "train_stage2_loss_variants" / name)
    assert loaded.config.epochs_image == epochs
    assert any("'epochs' read as 'epochs_image': " in note and "no prompt stage" in note
               for note in loaded.notes)


def test_a_renamed_upstream_key_that_contradicts_its_knob_is_refused():
    with pytest.raises(ConfigError, match=r"^f.yml: key 'epochs': 3 contradicts 'epochs_image'"):
        build_config({"epochs": 3, "epochs_image": 5}, "f.yml")
    assert build_config({"epochs": 3, "epochs_image": 3}).config.epochs_image == 3


def test_cli_config_check_accepts_all_eight_seed_files(capsys):
    for name in OTHER_SCRIPTS_IGNORED:
        assert main(["config", "check", str(SEED_FILES / name)]) == 0
        assert capsys.readouterr().err.strip().endswith(": valid")
