"""Upstream "as-run" switches: each reproduces exactly the behaviour it names, the schedule
replays match the thesis's logged learning-rate traces, and the as-run table matches the spec."""

import os

import pytest
import torch

from tune_clipfh.config import build_config
from tune_clipfh.train.run import prepare_data
from tune_clipfh.train.stages import Trainer
from tune_clipfh.train.upstream_schedules import UpstreamSchedules
from tune_clipfh.tune.experiment import ablation_trials
from tune_clipfh.tune.versions import VERSIONS_AS_RUN_FILE, load_versions

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUICK = {"profile": "tiny", "pretrained": "none", "epochs_prompt": 1, "epochs_image": 1,
         "early_stop_patience": 0, "n_ctx": 4, "lr": 1e-3, "aug_hflip": 0.0}


# --- schedule replays vs spec Appendix A (28 batches per epoch, 30 + 30 epochs) ---------------

def image_stage_trace(mode, rates, log_before_step, epochs=14):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in rates]
    optimizer = torch.optim.AdamW([{"params": [p], "lr": r} for p, r in zip(params, rates,
                                                                           strict=True)])
    schedules = UpstreamSchedules(mode, optimizer, 30, 30, 28, 1e-6)
    for stage, count in (("prompt", 30), ("image", epochs)):
        stepper, trace = schedules.for_stage(stage), []
        for _ in range(count):
            if log_before_step:
                trace.append(f"{optimizer.param_groups[0]['lr']:.6f}")
            for _ in range(28):
                optimizer.step()
                stepper.after_batch()
            if not log_before_step:
                trace.append(f"{optimizer.param_groups[0]['lr']:.6f}")
            stepper.after_epoch()
    return trace


def as_floats(text):
    return [f"{float(x) * 1e-6:.6f}" for x in text.split()]


def test_v1_single_cosine_across_stages_rises_in_the_image_stage():
    trace = image_stage_trace("v1_single_epoch_cosine", [1e-4], log_before_step=True)
    assert trace[:10] == as_floats("1 1 2 3 5 8 10 14 17 21")


def test_v2_prompt_per_batch_then_image_per_epoch_cosine():
    trace = image_stage_trace("v2_batch_then_epoch_cosine", [1e-4, 1e-5, 5e-6], True)
    assert trace[:13] == as_floats("100 100 99 98 96 93 91 87 84 80 75 71 66")


@pytest.mark.parametrize("rates, expected", [
    ([1e-4, 1e-5, 5e-6], "1 3 4 4 4 4 4 4 4 3 3 3 3 3"),        # ViT: every group peaks 4e-6
    ([1e-4, 5e-4, 5e-6], "6 15 20 20 20 19 19 18 18 17"),       # RN50: 2e-5
])
def test_v3_double_onecycle_peaks_every_group_at_max_over_25(rates, expected):
    trace = image_stage_trace("v3_double_onecycle", rates, log_before_step=False)
    assert trace[:len(expected.split())] == as_floats(expected)


def test_v8_cosine_stepped_per_batch_cycles_every_60_batches():
    trace = image_stage_trace("v8_cyclic_batch_cosine", [1e-4, 1e-5, 5e-6], False)
    assert trace[:13] == as_floats("2 96 10 84 26 66 45 45 66 26 84 10 96")


# --- each switch changes exactly its behaviour ------------------------------------------------

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("as-run-cache"))


@pytest.fixture(scope="module")
def data(cache_dir):
    return prepare_data(build_config({**QUICK, "cache_dir": cache_dir}).config, progress=False)


def trainer(data, cache_dir, **knobs):
    config = build_config({**QUICK, "cache_dir": cache_dir, **knobs}, "test").config
    return Trainer(config, data, log=lambda _: None, progress=False)


def test_eval_fusion_changes_test_scores_not_validation(data, cache_dir):
    plain = trainer(data, cache_dir, seed=5).run()
    fused = trainer(data, cache_dir, seed=5, eval_fusion="sos_text").run()
    assert [r.get("val_rank1") for r in plain.history] == \
        [r.get("val_rank1") for r in fused.history]
    assert [s["mAP"] for s in plain.test["per_split"]] != \
        [s["mAP"] for s in fused.test["per_split"]]


def test_train_normalize_changes_training_inputs_not_the_test(data, cache_dir):
    correct = trainer(data, cache_dir)
    upstream = trainer(data, cache_dir, train_normalize=False)
    upstream.model.load_part_state(correct.model_state())
    assert correct.evaluator.validate() != upstream.evaluator.validate()  # val inputs differ
    # test inputs are normalised in both
    assert correct.evaluator.test()["mean"] == upstream.evaluator.test()["mean"]


def test_sos_pooling_makes_every_identity_text_identical(data, cache_dir):
    for pool, identical in (("eot", False), ("sos", True)):
        t = trainer(data, cache_dir, text_pool_image=pool, epochs_image=1)
        t.run()
        text = t._identity_text
        assert torch.allclose(text, text[:1].expand_as(text), atol=1e-5) is identical


def test_linear_id_loss_head_leaves_arcface_untrained(data, cache_dir):
    t = trainer(data, cache_dir, id_head="arcface", id_loss_head="linear")
    arcface = t.model.head.classifier.weight.detach().clone()
    linear = t.model.loss_head.weight.detach().clone()
    t.run()
    assert torch.equal(arcface, t.model.head.classifier.weight)
    assert not torch.equal(linear, t.model.loss_head.weight)


def test_heads_not_trainable_keep_their_init(data, cache_dir):
    t = trainer(data, cache_dir, heads_trainable=False)
    before = t.model.head.classifier.weight.detach().clone()
    t.run()
    assert torch.equal(before, t.model.head.classifier.weight)


def test_centres_stay_at_init_without_update(data, cache_dir):
    t = trainer(data, cache_dir, loss_use_center=True, update_centers=False)
    before = t.model.center.centers.detach().clone()
    t.run()
    assert torch.equal(before, t.model.center.centers)


def test_select_on_test_split0_selects_on_test_identities(data, cache_dir):
    t = trainer(data, cache_dir, select_on="test_split0")
    selection = t.evaluator.validate()
    t.config.select_on = "val"
    assert selection != t.evaluator.validate()
    assert selection["rank1"] == pytest.approx(t.evaluator.test()["per_split"][0]["rank1"])


def test_shared_optimizer_serves_both_stages(data, cache_dir):
    t = trainer(data, cache_dir, shared_optimizer_across_stages=True,
                schedule_mode="v8_cyclic_batch_cosine")
    optimizers = []
    t.run(lambda record: optimizers.append(t.optim.optimizer))
    assert optimizers[0] is optimizers[-1]
    assert [g["name"] for g in t.optim.optimizer.param_groups][:3] == ["prompt", "visual", "text"]


# --- the as-run table vs the spec's effective columns (section 5) -----------------------------

EXPECTED = {  # version: (schedule_mode, ID loss head, heads trained, unfreeze vit, unfreeze rn50)
    "v1": ("v1_single_epoch_cosine", "id_head", True, ("all", 12), ("all", 4)),
    "v2": ("v2_batch_then_epoch_cosine", "id_head", False, ("all", 12), ("all", 4)),
    "v3": ("v3_double_onecycle", "linear", False, ("all", 12), ("all", 4)),
    "v4": ("v3_double_onecycle", "linear", False, ("all", 12), ("all", 4)),
    "v5": ("v3_double_onecycle", "linear", False, ("all", 12), ("all", 4)),
    "v6": ("v3_double_onecycle", "linear", False, ("last_n_blocks", 2), ("last_n_blocks", 2)),
    "v7": ("v3_double_onecycle", "linear", False, ("last_n_blocks", 2), ("last_n_blocks", 2)),
    "v8": ("v8_cyclic_batch_cosine", "linear", False, ("last_n_blocks", 12), ("last_n_blocks", 4)),
    "v9": ("v8_cyclic_batch_cosine", "linear", False, ("last_n_blocks", 12), ("last_n_blocks", 4)),
    "v10": ("v8_cyclic_batch_cosine", "linear", False, ("last_n_blocks", 12), ("last_n_blocks", 4)),
}
RN50_VISUAL = {"v1": None, "v2": 1e-4, "v3": 5e-4, "v4": 5e-4, "v5": 5e-4, "v6": 5e-4,
               "v7": 5e-4, "v8": 1e-4, "v9": 7e-5, "v10": 7e-5}
ALWAYS = {"train_normalize": False, "text_pool_prompt": "mean", "text_pool_image": "sos",
          "eval_fusion": "sos_text", "update_centers": False, "supcon_exclude_own_pair": True,
          "sampler": "random", "shared_optimizer_across_stages": True,
          "select_on": "test_split0", "freeze_text_encoder": False, "label_smoothing": 0.0,
          "max_norm": None}


def test_as_run_versions_match_the_spec():
    resolved = load_versions(VERSIONS_AS_RUN_FILE)
    for backbone, column in (("vitb16", 3), ("rn50", 4)):
        for version, expected in EXPECTED.items():
            knobs = resolved[backbone][version].knobs
            assert (knobs["schedule_mode"], knobs["id_loss_head"], knobs["heads_trainable"],
                    (knobs["unfreeze_mode"], knobs["unfreeze_blocks"])) == \
                (*expected[:3], expected[column]), (backbone, version)
            assert {k: knobs[k] for k in ALWAYS} == ALWAYS
            if backbone == "rn50":
                assert knobs["lr_visual"] == RN50_VISUAL[version], version
    assert {v for v, item in resolved["vitb16"].items() if not item.thesis_run} == \
        {"v7", "v8", "v10"}


def test_effective_onecycle_peak_of_the_as_run_v3():
    for backbone, peak in (("vitb16", 4e-6), ("rn50", 2e-5)):
        knobs = load_versions(VERSIONS_AS_RUN_FILE)[backbone]["v3"].knobs
        rates = [knobs["lr_prompt"], knobs["lr_visual"], knobs["lr_text"]]
        trace = image_stage_trace("v3_double_onecycle", rates, False, epochs=30)
        assert max(float(x) for x in trace) == pytest.approx(peak, rel=0.05)


def test_ablation_switches_one_bug_back_at_a_time():
    trials = ablation_trials("vitb16", "v5", "tiny", {})
    labels = [t["ablation"] for t in trials]
    assert labels[:2] == ["correct", "as_run"]
    as_run = trials[1]
    for trial in trials[2:]:
        changed = {k for k in ALWAYS | {"schedule_mode": 0, "id_loss_head": 0,
                                        "heads_trainable": 0, "pk_k": 0}
                   if trial[k] != as_run[k]}
        assert changed, trial["ablation"]
        assert all(trial[k] == trials[0][k] for k in changed)
    assert "as_run-B12 eval_fusion" in labels and "as_run-B8 schedule_mode" in labels
