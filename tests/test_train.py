"""The training core on tiny models and synthetic data: it learns, every knob does what it says."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tune_clipfh.config import build_config
from tune_clipfh.data.errors import DataError
from tune_clipfh.loss_table import stage_terms
from tune_clipfh.model.registry import BACKBONES
from tune_clipfh.train.optim import ParamGroup, ScheduleSpec, StageSchedule, build_optimizer
from tune_clipfh.train.precision import Precision, autocast_dtype
from tune_clipfh.train.run import evaluate_run, load_torch, prepare_data, train_run
from tune_clipfh.train.stages import DeviceUnavailable, Trainer, pick_device

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUICK = {"profile": "tiny", "pretrained": "none", "epochs_prompt": 1, "epochs_image": 1,
         "early_stop_patience": 0, "n_ctx": 4, "lr": 1e-3, "lr_prompt": 5e-3,
         "aug_hflip": 0.0}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("train-cache"))


def make_config(cache_dir, **knobs):
    return build_config({**QUICK, "cache_dir": cache_dir, **knobs}, "test").config


@pytest.fixture(scope="module")
def data(cache_dir):
    return prepare_data(make_config(cache_dir), progress=False)


def quiet(_line):
    pass


def trainer_for(data, cache_dir, **knobs):
    return Trainer(make_config(cache_dir, **knobs), data, log=quiet, progress=False)


def test_short_run_beats_chance_and_the_untrained_model(data, cache_dir):
    trainer = trainer_for(data, cache_dir, model="rn50", unfreeze_mode="all",
                          unfreeze_blocks=4, epochs_prompt=3, epochs_image=20,
                          early_stop_patience=8, lr_visual=1e-3, lr_head=1e-3,
                          warmup_epochs=1, aug_pad_crop=4, label_smoothing=0.1)
    result = trainer.run()
    chance = 1 / len(set(data.val_ids[data.val_split.gallery]))
    untrained = trainer.initial_val["rank1"]
    assert result.status in ("completed", "early_stopped")
    assert result.best_val["rank1"] >= 3 * chance
    assert result.best_val["rank1"] >= untrained + 0.1
    # The test ranks 40 identities: well above chance too.
    assert result.test["mean"]["rank1"] >= 3 / 40


@pytest.mark.parametrize("term", stage_terms("image"), ids=lambda t: t.column)
def test_each_loss_flag_removes_exactly_its_term(data, cache_dir, term):
    flag, term = term.toggle, term.column
    on = trainer_for(data, cache_dir, loss_use_center=True).run()
    off = trainer_for(data, cache_dir, **{"loss_use_center": True, flag: False}).run()
    image_on = [r for r in on.history if r["stage"] == "image"][0]
    image_off = [r for r in off.history if r["stage"] == "image"][0]
    assert term in image_on and term not in image_off
    assert set(image_on) - set(image_off) == {term}
    assert math.isfinite(image_off["loss_total"]) and off.status == "completed"


def test_center_loss_centres_move(data, cache_dir):
    trainer = trainer_for(data, cache_dir, loss_use_center=True, center_loss_weight=0.01,
                          center_lr=0.5)
    before = trainer.model.center.centers.detach().clone()
    trainer.run()
    assert not torch.allclose(before, trainer.model.center.centers)


def _changed(before, after):
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_unfreeze_two_blocks_trains_only_them_and_the_heads(data, cache_dir):
    trainer = trainer_for(data, cache_dir, model="vitb16", unfreeze_blocks=2,
                          unfreeze_mode="last_n", stage_mode="image_only", lr=1e-2)
    visual_before = {k: v.clone() for k, v in trainer.model.backbone.clip.visual.state_dict().items()}
    head_before = {k: v.clone() for k, v in trainer.model.head.state_dict().items()}
    trainer.run()
    changed = _changed(visual_before, trainer.model.backbone.clip.visual.state_dict())
    # the two last blocks and the layers after them (ln_post, proj); nothing below
    assert changed and all(n.startswith(("transformer.resblocks.10.", "transformer.resblocks.11.",
                                         "ln_post.", "proj")) for n in changed)
    assert {"proj", "ln_post.weight"} <= changed
    assert "classifier.weight" in _changed(head_before, trainer.model.head.state_dict())


def test_frozen_text_encoder_gets_no_update(data, cache_dir):
    trainer = trainer_for(data, cache_dir)
    text_before = {k: v.clone() for k, v in trainer.model.backbone.clip.state_dict().items()
                   if not k.startswith("visual.")}
    prompts_before = trainer.model.prompts.context.detach().clone()
    trainer.run()
    after = trainer.model.backbone.clip.state_dict()
    assert not _changed(text_before, {k: after[k] for k in text_before})
    assert not torch.equal(prompts_before, trainer.model.prompts.context)


def test_onecycle_gives_each_group_its_own_peak():
    groups = [ParamGroup("visual", [torch.nn.Parameter(torch.zeros(1))], 1e-3, 0.0),
              ParamGroup("head", [torch.nn.Parameter(torch.zeros(1))], 1e-2, 0.0)]
    optimizer = build_optimizer("adamw", groups)
    schedule = StageSchedule(optimizer, ScheduleSpec(kind="onecycle", per_batch=True,
                                                     onecycle_pct_start=0.1), 10, 10)
    trace = []
    for _ in range(100):
        trace.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        schedule.after_batch()
    trace = np.array(trace)
    assert trace[:, 0].max() == pytest.approx(1e-3) and trace[:, 1].max() == pytest.approx(1e-2)
    assert trace[0, 0] == pytest.approx(1e-3 / 25)
    assert trace[:, 0].argmax() == 10  # the peak after pct_start of the steps


def test_cosine_per_batch_decays_once_over_all_batches():
    optimizer = build_optimizer("adam", [ParamGroup("visual", [torch.nn.Parameter(
        torch.zeros(1))], 1e-4, 0.0)])
    schedule = StageSchedule(optimizer, ScheduleSpec(kind="cosine", per_batch=True,
                                                     eta_min=1e-6), 30, 28)
    trace = []
    for _ in range(30 * 28):
        trace.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.after_batch()
    assert all(a >= b for a, b in zip(trace, trace[1:], strict=False))  # no upstream cycling (B8)
    assert trace[-1] == pytest.approx(1e-6, rel=0.05)


def test_huge_learning_rate_ends_as_diverged(data, cache_dir):
    result = trainer_for(data, cache_dir, optimizer="sgd", lr=10.0, stage_mode="image_only",
                         epochs_image=3, loss_use_triplet=False).run()
    assert result.status == "diverged"
    assert result.diverged_at["stage"] == "image" and result.test is None


def test_same_seed_same_metrics(data, cache_dir):
    a = trainer_for(data, cache_dir, seed=3).run()
    b = trainer_for(data, cache_dir, seed=3).run()
    assert a.history[-1]["loss_total"] == b.history[-1]["loss_total"]
    assert a.test["mean"] == b.test["mean"]


def test_resumed_run_equals_uninterrupted_run(data, cache_dir):
    knobs = {"epochs_prompt": 2, "epochs_image": 3, "seed": 1}
    full = trainer_for(data, cache_dir, **knobs).run()

    class Stop(Exception):
        pass

    first = trainer_for(data, cache_dir, **knobs)
    saved = {}

    def stop_after_image_epoch_1(record):
        if record.stage == "image" and record.epoch == 1:
            saved["state"] = first.state_dict()
            raise Stop

    with pytest.raises(Stop):
        first.run(stop_after_image_epoch_1)
    second = trainer_for(data, cache_dir, **knobs)
    second.load_state_dict(saved["state"])
    resumed = second.run()
    assert [r["loss_total"] for r in resumed.history if r["stage"] == "image"] == \
        [r["loss_total"] for r in full.history if r["stage"] == "image"]
    assert resumed.test["mean"] == full.test["mean"]


def test_run_folder_checkpoint_reloads_to_the_same_metrics(cache_dir, tmp_path):
    config = make_config(cache_dir, epochs_image=2)
    result = train_run(config, tmp_path, log=quiet, progress=False)
    for name in ("config.yaml", "metrics.jsonl", "best.pt", "test_results.json",
                 "test_results.csv", "summary.json"):
        assert (tmp_path / name).is_file(), name
    checkpoint = load_torch(tmp_path / "best.pt")  # weights_only=True
    assert checkpoint["epoch"] == result.best_epoch and checkpoint["backbone"] == "tiny-vit"
    header = (tmp_path / "test_results.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["version", "split1_R1", "split1_R5"] and header[-1] == "final_mAP"
    again = evaluate_run(tmp_path, log=quiet, progress=False)
    for key in ("rank1", "mAP"):
        assert again["mean"][key] == pytest.approx(result.test["mean"][key], abs=1e-9)


def test_logged_rate_is_the_rate_the_epoch_trained_at(data, cache_dir):
    """Per-epoch cosine without warm-up: epoch 1 trains at the base rate, the last epoch at the
    rate the schedule reaches after epochs - 1 steps (not the next epoch's)."""
    trainer = trainer_for(data, cache_dir, stage_mode="image_only", epochs_image=3,
                          scheduler="cosine", lr_visual=1e-3, eta_min=0.0,
                          limit_train_batches=1)
    rates = [r["lr_visual"] for r in trainer.run().history]
    # the tiny profile trains the image tower at the stated rate x the backbone's scale
    base = 1e-3 * BACKBONES[trainer.config.model].tiny_lr_scale
    assert rates[0] == pytest.approx(base)
    assert rates[1] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi / 3)))
    assert rates[2] == pytest.approx(base * 0.5 * (1 + math.cos(2 * math.pi / 3)))


def test_limit_train_batches_caps_both_stages(data, cache_dir):
    trainer = trainer_for(data, cache_dir, limit_train_batches=2)
    assert trainer.batches_per_epoch == 2 < len(trainer.sampler)
    steps = []
    original = trainer._step
    trainer._step = lambda *a, **k: (steps.append(trainer.stage), original(*a, **k))
    trainer.run()
    assert steps == ["prompt", "prompt", "image", "image"]


def test_concat_eval_feature_joins_two_unit_halves(data, cache_dir):
    trainer = trainer_for(data, cache_dir, eval_feature="concat")
    rows = data.val_rows[:4]
    raw = trainer.evaluator.extract(rows, feature="concat") * math.sqrt(2)  # undo the final normalise
    projected = trainer.evaluator.extract(rows, feature="pre_bn")
    half = raw.shape[1] - projected.shape[1]
    assert torch.allclose(raw[:, :half].norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(raw[:, half:], projected, atol=1e-5)
    assert trainer.run().test["mean"]["rank1"] > 0


def test_eval_flip_averages_each_image_with_its_mirror(data, cache_dir):
    trainer = trainer_for(data, cache_dir, eval_flip=True)
    rows = data.val_rows[:4]
    averaged = trainer.evaluator.extract(rows)
    images = next(iter(trainer.evaluator.loader.evaluation(rows, len(rows))))
    model = trainer.model
    model.backbone.eval()  # as extract runs it
    with torch.no_grad():
        both = model.embed(images, "pre_bn") + model.embed(images.flip(-1), "pre_bn")
    assert torch.allclose(averaged, F.normalize(both, dim=1), atol=1e-5)


def test_the_data_must_be_what_the_config_says(data, cache_dir):
    """The embedded dataset is 11k dorsal_r: the defaults load it; another aspect or dataset is
    refused, naming both."""
    assert (data.manifest.dataset, data.manifest.aspect) == ("11k", "dorsal_r")
    for knobs, message in (
        ({"aspect": "palmar_l"}, "key 'aspect': palmar_l, but the folder was prepared for "
                                 "dorsal_r (set aspect: dorsal_r, or prepare a folder with "
                                 "--aspect palmar_l)"),
        ({"dataset": "hd"}, "key 'dataset': hd, but the folder was prepared for 11k"),
    ):
        with pytest.raises(DataError, match=re.escape(message)):
            prepare_data(make_config(cache_dir, **knobs), progress=False)


def _capture_loss_inputs(trainer, monkeypatch):
    import tune_clipfh.train.stages as stages

    seen = []
    original = stages.weighted_terms

    def spy(config, stage, inputs):
        terms = original(config, stage, inputs)
        seen.append((inputs, terms))
        return terms

    monkeypatch.setattr(stages, "weighted_terms", spy)
    return seen


def test_heads_losses_and_logits_stay_fp32_under_autocast(data, cache_dir, monkeypatch):
    """bf16 autocast covers the encoders only: ArcFace logits in bf16 are off by whole logits."""
    trainer = trainer_for(data, cache_dir, stage_mode="image_only", id_head="arcface",
                          arcface_scale=35.0, loss_use_center=True, limit_train_batches=1)
    trainer.precision = Precision(torch.device("cpu"), torch.bfloat16)
    seen = _capture_loss_inputs(trainer, monkeypatch)
    encoded = []
    trainer.model.backbone.register_forward_hook(lambda m, i, out: encoded.append(out.dtype))
    trainer.model.backbone.clip.visual.register_forward_hook(
        lambda m, i, out: encoded.append(out.dtype))
    trainer.run()
    assert torch.bfloat16 in encoded  # the encoder did run in bf16
    inputs, terms = seen[0]
    for tensor in (inputs.features, inputs.bn_features, inputs.logits, inputs.identity_text):
        assert tensor.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in terms.values())


def test_fp16_uses_a_grad_scaler_that_also_steps_the_centres(data, cache_dir):
    trainer = trainer_for(data, cache_dir, stage_mode="image_only", loss_use_center=True,
                          center_loss_weight=0.01, limit_train_batches=2)
    trainer.precision = Precision(torch.device("cpu"), torch.float16)
    before = trainer.model.center.centers.detach().clone()
    result = trainer.run()
    assert result.status == "completed"
    assert trainer.precision.scaler is not None and trainer.precision.scaler.get_scale() > 0
    assert not torch.allclose(before, trainer.model.center.centers)


def test_amp_auto_picks_bf16_only_on_cards_that_compute_it(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert autocast_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert autocast_dtype("auto", cuda) == torch.float16
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("off", cuda) is None


def test_cuda_requested_without_a_card_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailable, match="device: cuda requested"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"


def test_zero_shot_evaluates_the_untrained_model_in_a_run_format(data, cache_dir, tmp_path):
    from tune_clipfh.train.run import zero_shot_run

    config = make_config(cache_dir, limit_train_batches=1)
    result = zero_shot_run(config, tmp_path / "zs", log=quiet, progress=False)
    trained = Trainer(config, data, log=quiet, progress=False).run()
    written = json.loads((tmp_path / "zs" / "test_results.json").read_text())
    assert len(written["per_split"]) == 10
    assert written["mean"]["rank1"] == pytest.approx(result["test"]["mean"]["rank1"])
    # the same model before any training: the run's own starting point
    assert result["val"]["rank1"] == pytest.approx(trained.history[0]["val_rank1"])
    assert json.loads((tmp_path / "zs" / "summary.json").read_text())["zero_shot"] is True


@pytest.mark.slow  # 24 blocks: about 40 s on 2 cores
def test_a_backbone_added_through_the_registry_alone_trains(data, cache_dir):
    """ViT-L/14 was added as one registry entry and one tiny config: it trains end to end."""
    trainer = trainer_for(data, cache_dir, model="vitl14", unfreeze_blocks=24,
                          limit_train_batches=1)
    assert len(trainer.model.backbone.visual_blocks) == 24
    result = trainer.run()
    assert result.status == "completed" and len(result.test["per_split"]) == 10
