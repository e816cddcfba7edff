"""The full-size models on the real path, on the CPU: ViT-B/16 and RN50 at 224 px from a local
weights file, one limited epoch per stage on a small synthetic set, the 10 test splits.

``pretrained`` is a file the test writes from a random-init model, in the two formats users
bring: open_clip's state dict (half precision, as OpenAI ships its weights) and OpenAI's
TorchScript archive. The archive is scripted here from the same state-dict layout OpenAI's
``model.pt`` carries (plus its ``input_resolution``/``context_length``/``vocab_size`` entries);
open_clip reads only that state dict from such a file.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from tune_clipfh.config import build_config
from tune_clipfh.data.hands11k import prepare_11k
from tune_clipfh.data.synth import synthesize
from tune_clipfh.model.backbone import create_backbone
from tune_clipfh.train.run import train_run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = [pytest.mark.slow,
              # writing OpenAI's format needs TorchScript, which torch now calls deprecated
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]


def write_state_dict(model: str, path) -> None:
    state = create_backbone(model, profile="full").clip.state_dict()
    torch.save({k: v.half() for k, v in state.items()}, path)


def write_openai_torchscript(model: str, path) -> None:
    clip = create_backbone(model, profile="full").clip
    state = {**clip.state_dict(), "input_resolution": torch.tensor(224),
             "context_length": torch.tensor(clip.context_length),
             "vocab_size": torch.tensor(clip.vocab_size)}
    root = nn.Module()
    for key, value in state.items():
        *path_parts, leaf = key.split(".")
        node = root
        for part in path_parts:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_buffer(leaf, value.half() if value.is_floating_point() else value)
    torch.jit.script(root).save(str(path))


@pytest.fixture(scope="module")
def data_224(tmp_path_factory):
    root = tmp_path_factory.mktemp("full-224")
    synthesize(root / "src", identities=12, images_per_identity=4, seed=5, progress=False)
    prepare_11k(root / "src", "dorsal_r", root / "prepared", progress=False)
    return root


@pytest.mark.parametrize("model, writer", [("vitb16", write_state_dict),
                                           ("rn50", write_openai_torchscript)])
def test_full_profile_trains_one_limited_epoch_per_stage_at_224(model, writer, data_224,
                                                                tmp_path):
    weights = tmp_path / f"{model}.pt"
    writer(model, weights)
    config = build_config({
        "model": model, "profile": "full", "pretrained": str(weights), "device": "cpu",
        "data_dir": str(data_224 / "prepared"), "cache_dir": str(data_224 / "cache"),
        "epochs_prompt": 1, "epochs_image": 1, "limit_train_batches": 1, "batch_size": 8,
        "pk_k": 2, "n_ctx": 4, "early_stop_patience": 0, "unfreeze_blocks": 1,
    }, "test").config
    result = train_run(config, tmp_path / "run", log=lambda _: None, progress=False)
    assert result.status == "completed"
    assert result.epochs_run == {"prompt": 1, "image": 1}
    tested = json.loads((tmp_path / "run" / "test_results.json").read_text())
    assert len(tested["per_split"]) == 10
    assert 0.0 <= tested["mean"]["rank1"] <= 1.0
