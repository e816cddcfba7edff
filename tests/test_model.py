import os

os.environ["HF_HUB_OFFLINE"] = "1"  # weights can never be downloaded in tests

import math
import time

import open_clip
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from open_clip.modified_resnet import ModifiedResNet

from tune_clipfh.model.backbone import (
    TEXT_TOWER,
    ModelLoadError,
    configure_text_trainable,
    configure_visual_trainable,
    create_backbone,
)
from tune_clipfh.model.heads import BNNeck, LinearHead, ReIDHead
from tune_clipfh.model.prompt import PromptLearner, aspect_phrase
from tune_clipfh.model.registry import BACKBONES, backbone_spec


@pytest.fixture(params=list(BACKBONES))
def tiny(request):
    torch.manual_seed(0)
    return create_backbone(request.param, profile="tiny")


@pytest.fixture
def tiny_vit():
    torch.manual_seed(0)
    return create_backbone("vitb16", profile="tiny")


def images(backbone, batch=4):
    return torch.randn(batch, 3, backbone.image_size, backbone.image_size)


def visual_grads(backbone):
    return {name: p.grad for name, p in backbone.clip.named_parameters()
            if name.startswith("visual.")}


# --- backbone -----------------------------------------------------------------------------


def test_tiny_backbone_builds_and_encodes(tiny):
    assert tiny.profile == "tiny"
    assert tiny.image_size == 64
    assert len(tiny.visual_blocks) == backbone_spec(tiny.name).blocks
    features = tiny.encode_image(images(tiny))
    assert features.shape == (4, tiny.embed_dim)
    assert tiny.tokenizer.context_length == tiny.context_length
    assert not any(p.requires_grad for p in tiny.parameters())  # created frozen


@pytest.mark.parametrize(("model", "arch", "embed_dim", "blocks"),
                         [("vitb16", "ViT-B-16", 512, 12), ("rn50", "RN50", 1024, 4),
                          pytest.param("vitl14", "ViT-L-14", 768, 24,
                                       marks=pytest.mark.slow)])  # 428 M parameters
def test_full_profile_builds_the_clip_architectures(model, arch, embed_dim, blocks):
    assert backbone_spec(model).architecture("full") == arch
    backbone = create_backbone(model, profile="full")
    assert (backbone.arch, backbone.image_size, backbone.embed_dim) == (arch, 224, embed_dim)
    assert len(backbone.visual_blocks) == blocks
    assert backbone.context_length == 77
    assert open_clip.get_model_config(arch)["vision_cfg"]["image_size"] == 224


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"model": "vit"}, "valid: vitb16, rn50, vitl14"),
    ({"model": "vitb16", "profile": "small"}, "valid: full, tiny"),
])
def test_invalid_model_or_profile_lists_valid_values(kwargs, expected):
    with pytest.raises(ModelLoadError, match=expected):
        create_backbone(**kwargs)


@pytest.mark.parametrize(("mode", "with_head"), [("last_n", True), ("last_n_blocks", False)])
def test_last_n_trains_the_top_blocks_and_the_layers_after_them(tiny, mode, with_head):
    """Correct mode: the last N blocks and everything after them (ViT ln_post + proj, RN50
    attnpool); upstream's last_n_blocks (B13) leaves the projection frozen."""
    names = configure_visual_trainable(tiny, 2, mode=mode)
    expected = {id(p) for block in tiny.visual_blocks[-2:] for p in block.parameters()}
    head = {id(p) for p in tiny.visual_head_parameters}
    assert head and not head & expected
    if with_head:
        expected |= head
    tiny.train()
    tiny.encode_image(images(tiny)).square().sum().backward()
    for name, param in tiny.clip.named_parameters():
        trained = id(param) in expected
        assert param.requires_grad == trained, name
        assert (param.grad is not None) == trained, name
    assert names and all(n.startswith("visual.") for n in names)
    assert len(names) == len(expected)
    head_names = {"visual.proj", "visual.ln_post.weight"} if "visual.proj" in dict(
        tiny.clip.named_parameters()) else {"visual.attnpool.c_proj.weight"}
    assert (head_names <= set(names)) == with_head


def test_unfreezing_zero_blocks_leaves_the_image_tower_frozen(tiny):
    assert configure_visual_trainable(tiny, 0, mode="last_n") == []


def test_concat_feature_is_the_normalised_pre_projection_and_projected_features(tiny):
    x = images(tiny)
    tiny.eval()
    pre, projected = tiny.encode_image_parts(x)
    assert torch.allclose(projected, tiny.encode_image(x), atol=1e-5)
    visual = tiny.clip.visual
    if isinstance(visual, ModifiedResNet):  # the average-pooled layer4 map, before attnpool
        assert pre.shape[1] == visual.attnpool.k_proj.in_features
    else:  # the pooled token that proj maps to the projected feature
        assert torch.allclose(pre @ visual.proj, projected, atol=1e-5)


def test_mode_all_trains_the_whole_image_tower(tiny):
    configure_visual_trainable(tiny, 0, mode="all")
    tiny.encode_image(images(tiny)).square().sum().backward()
    grads = visual_grads(tiny)
    assert all(g is not None for g in grads.values())
    stem_and_projection = (["visual.conv1.weight", "visual.proj", "visual.positional_embedding",
                            "visual.class_embedding", "visual.ln_post.weight"]
                           if not isinstance(tiny.clip.visual, ModifiedResNet)
                           else ["visual.conv1.weight", "visual.bn1.weight",
                                 "visual.attnpool.c_proj.weight",
                                 "visual.attnpool.positional_embedding"])
    for name in stem_and_projection:
        assert grads[name].abs().sum() > 0, name


def test_zero_blocks_freezes_the_image_tower(tiny):
    assert configure_visual_trainable(tiny, 0) == []


@pytest.mark.parametrize(("model", "bad", "valid"),
                         [("vitb16", 13, "0..12"), ("rn50", 5, "0..4"), ("vitb16", -1, "0..12")])
def test_out_of_range_unfreeze_blocks_names_the_valid_range(model, bad, valid):
    backbone = create_backbone(model, profile="tiny")
    with pytest.raises(ValueError, match=rf"unfreeze_blocks: {bad} .*valid: {valid}"):
        configure_visual_trainable(backbone, bad)


def test_invalid_unfreeze_mode_raises(tiny_vit):
    with pytest.raises(ValueError, match="unfreeze_mode.*last_n, last_n_blocks, all"):
        configure_visual_trainable(tiny_vit, 2, mode="some")


def test_frozen_batchnorm_layers_stay_in_eval_mode_under_train():
    backbone = create_backbone("rn50", profile="tiny")
    configure_visual_trainable(backbone, 2)
    backbone.train()
    visual = backbone.clip.visual
    frozen_bns = [visual.bn1, visual.bn3, visual.layer1[0].bn1, visual.layer2[0].bn2]
    assert all(not bn.training for bn in frozen_bns)
    assert visual.layer4[0].bn1.training and visual.layer3[0].bn3.training
    before = visual.bn1.running_mean.clone()
    backbone.encode_image(images(backbone))
    assert torch.equal(visual.bn1.running_mean, before)
    backbone.eval()
    assert not visual.layer4[0].bn1.training
    configure_visual_trainable(backbone, 0, mode="all")  # re-evaluated on reconfiguration
    backbone.train()
    assert visual.bn1.training


def test_text_tower_is_frozen_unless_configured(tiny_vit):
    learner = PromptLearner(tiny_vit, identity_count=5)
    learner(torch.tensor([0, 1, 2])).square().sum().backward()
    assert learner.context.grad is not None and learner.context.grad.abs().sum() > 0
    text = [p for n, p in tiny_vit.clip.named_parameters() if n.split(".")[0] in TEXT_TOWER]
    assert all(p.grad is None for p in text)
    assert configure_text_trainable(tiny_vit, True)
    learner(torch.tensor([0, 1, 2])).square().sum().backward()
    assert tiny_vit.clip.transformer.resblocks[0].attn.in_proj_weight.grad is not None
    assert not tiny_vit.clip.logit_scale.requires_grad
    assert configure_text_trainable(tiny_vit, False) == []
    assert not any(p.requires_grad for p in text)


# --- pretrained weights ---------------------------------------------------------------------


def test_openai_offline_fails_fast_and_says_how_to_supply_a_file(tmp_path):
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as error:
        create_backbone("vitb16", profile="full", pretrained="openai", cache_dir=tmp_path)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert "\n" not in message
    assert "offline" in message and "pretrained: /path/to/ViT-B-16.pt" in message


def test_openai_with_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "https://127.0.0.1:9")  # discard port
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"127\.0\.0\.1:9 is unreachable.*RN50\.pt"):
        create_backbone("rn50", profile="full", pretrained="openai", cache_dir=tmp_path)
    assert time.monotonic() - start < 5


def test_openai_is_refused_for_the_tiny_profile():
    with pytest.raises(ModelLoadError, match="only for the full profile"):
        create_backbone("vitb16", profile="tiny", pretrained="openai")


@pytest.mark.parametrize("wrap", [False, True], ids=["state_dict", "checkpoint"])
def test_local_weights_file_loads_identical_weights(tiny, tmp_path, wrap):
    path = tmp_path / "weights.pt"
    state = tiny.clip.state_dict()
    torch.save({"state_dict": state, "epoch": 3} if wrap else state, path)
    torch.manual_seed(1)
    loaded = create_backbone(tiny.name, profile="tiny", pretrained=str(path))
    for name, tensor in loaded.clip.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_weights_of_another_architecture_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "rn.pt"
    torch.save(create_backbone("rn50", profile="tiny").clip.state_dict(), path)
    with pytest.raises(ModelLoadError) as error:
        create_backbone("vitb16", profile="tiny", pretrained=str(path))
    message = str(error.value)
    assert str(path) in message and "tiny-vit" in message and "\n" not in message
    assert "visual.class_embedding" in message and "shape mismatches" in message


def test_missing_weights_file_is_named(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(ModelLoadError, match=f"{path} does not exist"):
        create_backbone("vitb16", profile="tiny", pretrained=str(path))


# --- prompt learner -------------------------------------------------------------------------


def test_eot_token_survives_the_context(tiny_vit):
    learner = PromptLearner(tiny_vit, identity_count=3, n_ctx=12, aspect="dorsal_r")
    ids = learner.token_ids[0]
    eot = tiny_vit.tokenizer.eot_token_id
    assert ids[learner.eot_index[0]] == eot
    start = learner.ctx_starts[0]
    placeholder = tiny_vit.tokenizer.encode("X")[0]
    assert (ids[start:start + 12] == placeholder).all()
    after = tiny_vit.tokenizer.encode("dorsal right hand.")
    assert ids[start + 12:start + 12 + len(after)].tolist() == after
    assert learner.eot_index[0] == start + 12 + len(after)
    prompts = learner.prompt_embeddings(torch.tensor([2]))
    assert prompts.shape == (1, tiny_vit.context_length, tiny_vit.text_width)
    assert torch.equal(prompts[0, start:start + 12], learner.context[2])


def test_aspect_is_readable_or_removed(tiny_vit):
    assert aspect_phrase("palmar_l") == "palmar left"
    with_aspect = PromptLearner(tiny_vit, 2, n_ctx=4, aspect="dorsal_r")
    without = PromptLearner(tiny_vit, 2, n_ctx=4, aspect=None)
    aspect_tokens = len(tiny_vit.tokenizer.encode("dorsal right"))
    assert with_aspect.eot_index[0] - without.eot_index[0] == aspect_tokens


def test_context_placeholders_stand_as_words_of_their_own(tiny_vit):
    glued = PromptLearner(tiny_vit, 2, n_ctx=4, template="A photo of a{ctx}hand.")
    spaced = PromptLearner(tiny_vit, 2, n_ctx=4, template="A photo of a {ctx} hand.")
    assert torch.equal(glued.token_ids, spaced.token_ids)
    assert glued.ctx_starts == spaced.ctx_starts == [5]


@pytest.mark.parametrize("model", ["vitb16", "rn50"])
def test_eot_pooling_separates_identities_and_sos_does_not(model):
    backbone = create_backbone(model, profile="tiny")
    labels = torch.arange(4)
    eot = PromptLearner(backbone, 4)
    features = eot(labels)
    assert features.shape == (4, backbone.embed_dim)
    assert torch.cdist(features, features)[~torch.eye(4, dtype=torch.bool)].min() > 1e-4
    sos = PromptLearner(backbone, 4, pool="sos")
    sos_features = sos(labels)
    assert torch.allclose(sos_features, sos_features[:1].expand(4, -1), atol=1e-6)  # B2
    mean = PromptLearner(backbone, 4, pool="mean")
    assert mean(labels).shape == (4, backbone.embed_dim)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"template": "A photo of a hand."}, "prompt_template: 'A photo of a hand.' must contain"),
    ({"template": "A {ctx} and {ctx} hand."}, "exactly once"),
    ({"template": "A photo of {}'s {ctx} hand."}, "unknown placeholders"),
    ({"templates": ["{ctx}", "no placeholder"]}, "prompt_template_list: 'no placeholder'"),
    ({"n_ctx": 40}, "needs .* tokens but the text encoder holds 32"),
    ({"ctx_init": "a photo of"}, "ctx_init: 'a photo of' is 3 tokens but n_ctx is 4"),
    ({"pool": "cls"}, "valid: eot, sos, mean"),
])
def test_invalid_prompt_settings_raise(tiny_vit, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptLearner(tiny_vit, 3, **kwargs)


def test_ctx_init_initialises_every_identity(tiny_vit):
    learner = PromptLearner(tiny_vit, 3, n_ctx=4, ctx_init="a photo of the")
    ids = torch.tensor(tiny_vit.tokenizer.encode("a photo of the"))
    expected = tiny_vit.clip.token_embedding(ids)
    for identity in range(3):
        assert torch.equal(learner.context[identity], expected)


def test_templates_are_averaged_after_normalisation(tiny_vit):
    second = "A close-up of the {ctx} hand."
    both = PromptLearner(tiny_vit, 3, templates=[second])
    first_only = PromptLearner(tiny_vit, 3)
    second_only = PromptLearner(tiny_vit, 3, template=second)
    with torch.no_grad():
        first_only.context.copy_(both.context)
        second_only.context.copy_(both.context)
    labels = torch.tensor([0, 2])
    expected = (F.normalize(first_only(labels), dim=-1)
                + F.normalize(second_only(labels), dim=-1)) / 2
    assert torch.allclose(both(labels), expected, atol=1e-6)


def test_all_identity_features_are_batched_and_detached(tiny_vit):
    learner = PromptLearner(tiny_vit, 7)
    features = learner.all_identity_features(batch_size=3)
    assert features.shape == (7, tiny_vit.embed_dim) and not features.requires_grad
    assert torch.allclose(features, learner(torch.arange(7)), atol=1e-6)


def test_prompt_learner_owns_only_its_context(tiny_vit):
    learner = PromptLearner(tiny_vit, 5, n_ctx=4)
    assert [name for name, _ in learner.named_parameters()] == ["context"]
    assert list(learner.state_dict()) == ["context"]


# --- heads ----------------------------------------------------------------------------------


def test_bnneck_and_linear_head_initialisation():
    neck = BNNeck(8)
    assert torch.equal(neck.weight, torch.ones(8)) and torch.equal(neck.bias, torch.zeros(8))
    assert neck.weight.requires_grad and not neck.bias.requires_grad
    torch.manual_seed(0)
    head = LinearHead(512, 200)
    assert head.bias is None
    assert math.isclose(head.weight.std().item(), 0.001, rel_tol=0.05)


@pytest.mark.parametrize("id_head", ["linear", "arcface"])
def test_reid_head_returns_bn_features_and_logits(id_head):
    head = ReIDHead(16, 5, id_head=id_head)
    features, labels = torch.randn(6, 16), torch.tensor([0, 1, 2, 3, 4, 0])
    bn_features, logits = head(features, labels)
    assert bn_features.shape == (6, 16) and logits.shape == (6, 5)
    F.cross_entropy(logits, labels).backward()
    trainable = [p for p in head.parameters() if p.requires_grad]
    assert len(trainable) == 2  # BN weight and the classifier weight; the BN bias is frozen
    assert all(p.grad is not None for p in trainable)


def test_unknown_id_head_raises():
    with pytest.raises(ValueError, match="id_head.*linear, arcface"):
        ReIDHead(8, 3, id_head="cosface")
