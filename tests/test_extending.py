"""Extending the project is one table entry: a backbone is one registry entry (plus its tiny
config), a stateful loss one row of the loss table. Each test adds its entry for itself alone
(monkeypatch), builds with it and trains one step; the registries are as before afterwards.

The config schema's ``model`` choices are the registry's keys when the schema is imported, so
an entry added at run time, as here, is set on a validated config directly; an entry written
in ``model/registry.py`` is a valid ``model`` in every file and ``--set``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import open_clip
import pytest
import torch
from open_clip import factory
from torch import nn

from tune_clipfh import loss_table
from tune_clipfh.config import build_config
from tune_clipfh.loss_table import LossTerm
from tune_clipfh.model.backbone import ModelLoadError, configure_visual_trainable, create_backbone
from tune_clipfh.model.open_clip_configs import CONFIG_DIR
from tune_clipfh.model.registry import BACKBONES, BackboneSpec
from tune_clipfh.train.run import prepare_data
from tune_clipfh.train.stages import Trainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ONE_STEP = {"profile": "tiny", "pretrained": "none", "stage_mode": "image_only",
            "epochs_image": 1, "limit_train_batches": 1, "early_stop_patience": 0,
            "loss_use_i2t": False, "aug_hflip": 0.0}
"""One image-stage epoch of one batch: exactly one optimizer step."""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("extending-cache"))


@pytest.fixture(scope="module")
def data(cache_dir):
    return prepare_data(build_config({**ONE_STEP, "cache_dir": cache_dir}).config,
                        progress=False)


def one_step_config(cache_dir, **changes):
    config = build_config({**ONE_STEP, "cache_dir": cache_dir}, "test").config
    return dataclasses.replace(config, **changes)


def quiet(_line):
    pass


# ------------------------------------------------------------------ a backbone
@pytest.fixture
def wide_resnet(monkeypatch, tmp_path):
    """A second tiny ResNet width: a registry entry and a tiny JSON, registered for one test."""
    tiny = json.loads((CONFIG_DIR / "tiny-rn.json").read_text())
    tiny["vision_cfg"]["width"] = 24
    path = tmp_path / "tiny-rn-wide.json"
    path.write_text(json.dumps(tiny))
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    open_clip.add_model_config(path)
    spec = BackboneSpec("rn50w", "RN50", "tiny-rn-wide", tower="resnet", blocks=4,
                        image_size=224, channels_last=True, label="RN50 (wide tiny)",
                        tiny_lr_scale=2.3, thesis=False)
    monkeypatch.setitem(BACKBONES, spec.key, spec)
    return spec


def test_a_backbone_is_one_registry_entry_and_its_tiny_config(wide_resnet):
    backbone = create_backbone("rn50w", "tiny")
    assert backbone.arch == "tiny-rn-wide"
    assert backbone.clip.visual.layer1[0].conv1.in_channels == 24  # the JSON's width
    assert len(backbone.visual_blocks) == 4  # the ResNet stages, from the entry's tower
    names = configure_visual_trainable(backbone, 1)
    assert any(n.startswith("visual.layer4.") for n in names)
    assert any(n.startswith("visual.attnpool.") for n in names)
    assert not any(n.startswith("visual.layer3.") for n in names)
    with pytest.raises(ValueError, match=r"valid: 0\.\.4 ResNet stages"):
        configure_visual_trainable(backbone, 5)
    assert backbone.encode_image(torch.rand(2, 3, 64, 64)).shape == (2, backbone.embed_dim)


def test_a_backbone_without_a_recipe_says_what_to_add(wide_resnet):
    with pytest.raises(ModelLoadError) as error:
        create_backbone("rn50w", "tiny", "synthetic")
    message = str(error.value)
    assert "rn50w has no pretraining recipe" in message and "recipe=Recipe(" in message
    assert "model/registry.py" in message and "\n" not in message


def test_a_backbone_entry_trains_a_step(wide_resnet, data, cache_dir):
    trainer = Trainer(one_step_config(cache_dir, model="rn50w"), data, log=quiet,
                      progress=False)
    result = trainer.run()
    assert trainer.model.backbone.arch == "tiny-rn-wide"
    assert result.status == "completed" and len(result.history) == 1


# ------------------------------------------------------------------ a stateful loss
class Shift(nn.Module):
    """A toy loss's own parameter: one learnt offset per feature dimension."""

    def __init__(self, identities: int, dim: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(dim))


def undo_weight(module: nn.Module, weight: float) -> None:
    for param in module.parameters():
        param.grad.div_(weight)


TOY = LossTerm("toy", "image", "loss_use_toy", "weight_toy",
               # d loss / d shift = 1 per dimension: one SGD step moves it by -toy_lr exactly
               lambda x: x.states["toy"].shift.sum() + 0 * x.features.sum(), "toy",
               state=Shift, state_lr="toy_lr", state_updates="update_toy",
               rescale_state_grads=undo_weight)


def test_a_stateful_loss_is_one_row(monkeypatch, data, cache_dir):
    config = one_step_config(cache_dir)
    # the knobs a real row adds to the schema, set on this config alone
    config.loss_use_toy, config.weight_toy, config.update_toy = True, 2.0, True
    config.toy_lr = 0.25
    monkeypatch.setattr(loss_table, "LOSS_TABLE", (*loss_table.LOSS_TABLE, TOY))
    trainer = Trainer(config, data, log=quiet, progress=False)
    assert torch.equal(trainer.model.toy.shift, torch.zeros(trainer.model.backbone.embed_dim))
    result = trainer.run()
    # its own SGD at its own rate, its weight undone: exactly -toy_lr after one step
    shift = trainer.model.toy.shift
    assert torch.allclose(shift, torch.full_like(shift, -0.25))
    assert [group["lr"] for group in trainer.optim.state_optimizer.param_groups] == [0.25]
    assert "loss_toy" in result.history[0]
    assert "toy" in trainer.state_dict()["model"]  # a part of the checkpoint


def test_the_tables_are_as_before():
    assert TOY not in loss_table.LOSS_TABLE and "rn50w" not in BACKBONES
    assert "tiny-rn-wide" not in open_clip.list_models()
