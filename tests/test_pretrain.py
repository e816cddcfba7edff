"""Tests of synthetic contrastive pretraining: captions, the corpus namespace, the loss, the
loop's determinism, the cache, ``pretrained: synthetic`` and the ``pretrain`` verb.

Every pretraining here uses a recipe of a few identities and steps (seconds); the real
3-minute builds never run in the test suite.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import platform

import numpy as np
import open_clip
import pytest
import torch

from tune_clipfh.cli import main
from tune_clipfh.data.captions import CAPTION_FIELDS, caption
from tune_clipfh.data.errors import DataError
from tune_clipfh.data.prepared import SYNTHETIC_DEFAULT, synthetic_default
from tune_clipfh.data.synth import (
    ASPECTS_OF_HAND,
    FINGER_NAMES,
    NAMESPACE_SPAN,
    RING_COLOUR_NAMES,
    SKIN_TONES,
    HandAttributes,
    render,
)
from tune_clipfh.model import pretrain as pretrain_module
from tune_clipfh.model.backbone import ModelLoadError, create_backbone
from tune_clipfh.model.pretrain import (
    BUILD_THREADS,
    Recipe,
    batch_order,
    build_corpus,
    cache_key,
    contrastive_loss,
    create_model,
    pretrain,
    train_contrastive,
    weights_path,
)
from tune_clipfh.model.registry import BACKBONES

TINY = Recipe(identities=6, images_per_identity=2, steps=2, batch_size=8, warmup_steps=1)
"""A recipe of seconds, for everything but the loss-lowering test."""


def use_recipe(monkeypatch, key: str, recipe: Recipe) -> None:
    """Give a registry entry another pretraining recipe for one test."""
    monkeypatch.setitem(BACKBONES, key, dataclasses.replace(BACKBONES[key], recipe=recipe))


def attributes(**changes) -> HandAttributes:
    base = HandAttributes(id="10000000", age=30, gender="female", tone="fair", accessories=0,
                          nail_polish=0, aspect="dorsal right", ring_finger="index",
                          ring_colour="gold", moles=3, rotation=0.0)
    return dataclasses.replace(base, **changes)


# ------------------------------------------------------------------ captions
def test_captions_name_what_was_drawn():
    drawn = attributes(tone="very fair", ring_finger="little", ring_colour="blue", nail_polish=1,
                       accessories=1, rotation=-9.0)
    assert caption(drawn) == ("the back of a very fair right hand, a blue ring on the little "
                              "finger, red nails, three moles")
    assert caption(drawn, CAPTION_FIELDS) == (caption(drawn, CAPTION_FIELDS[:4])
                                              + ", a bracelet, tilted up, three moles")
    assert caption(attributes(rotation=9.0), ("tilt",)) == "a hand, tilted down"
    assert caption(attributes(rotation=2.0), ("tilt",)) == "a hand, level"
    palm = caption(attributes(aspect="palmar left", nail_polish=1))
    assert palm.startswith("the palm of a fair left hand") and "nails" not in palm
    # the default says only what every image of the hand (and aspect) shares
    assert caption(attributes(accessories=1, rotation=9.0)) == caption(attributes())
    assert caption(attributes(), ("tone", "marks")) == "a fair hand, three moles"
    assert caption(attributes(moles=1), ("marks",)) == "a hand, one mole"
    with pytest.raises(ValueError, match="sleeve"):
        caption(attributes(), ("tone", "sleeve"))


def test_captions_of_rendered_images_follow_their_attributes():
    for hand in render(4, 3, seed=0, namespace=1, aspects=("dorsal right", "palmar left")):
        drawn, text = hand.attributes, caption(hand.attributes, CAPTION_FIELDS)
        assert drawn.tone in text and f"{drawn.ring_colour} ring on the {drawn.ring_finger}" in text
        assert ("bracelet" in text) == bool(drawn.accessories)
        assert drawn.aspect.split()[1] in text


def test_every_caption_fits_the_tiny_text_context():
    from open_clip.tokenizer import _tokenizer

    context = open_clip.get_model_config("tiny-rn")["text_cfg"]["context_length"]
    longest = [caption(attributes(tone=tone, aspect=aspect, ring_colour=colour, ring_finger=finger,
                                  nail_polish=1, accessories=1, rotation=-10.0, moles=4),
                       CAPTION_FIELDS)
               for tone, aspect, colour, finger in itertools.product(
                   SKIN_TONES, ASPECTS_OF_HAND, RING_COLOUR_NAMES, FINGER_NAMES[1:])]
    # start and end-of-text tokens around the caption's own: nothing is truncated
    assert max(len(_tokenizer.encode(text)) + 2 for text in longest) <= context


# ------------------------------------------------------------------ corpus
def test_corpus_identities_are_disjoint_from_evaluation_datasets():
    def ids(count, namespace, seed=0):
        return {h.attributes.id for h in render(count, 1, seed=seed, namespace=namespace,
                                                aspects=("dorsal right",))}

    corpus = ids(50, TINY.namespace)
    default = ids(max(SYNTHETIC_DEFAULT["identities"], synthetic_default()["identities"]), 0,
                  SYNTHETIC_DEFAULT["seed"])
    assert corpus.isdisjoint(default)
    # structurally: namespace 0 ids stay below the span, which namespace n >= 1 starts from
    assert all(int(i) >= NAMESPACE_SPAN for i in corpus)
    assert all(int(i) < NAMESPACE_SPAN for i in default)
    with pytest.raises(DataError, match="at most"):
        next(render(NAMESPACE_SPAN + 1, 1))
    # other random streams too: same seed and identity number, another hand
    first = [np.asarray(next(iter(render(1, 1, seed=0, namespace=ns))).image) for ns in (0, 1)]
    assert not np.array_equal(*first)
    with pytest.raises(ValueError, match="namespace"):
        Recipe(namespace=0)
    with pytest.raises(ValueError, match="sleeve"):
        Recipe(caption_fields=("tone", "sleeve"))
    assert all(spec.recipe.namespace >= 1 for spec in BACKBONES.values() if spec.recipe)


def test_the_corpus_matches_the_stored_pixels_and_is_deterministic():
    corpus = build_corpus(TINY, seed=3, image_size=64)
    again = build_corpus(TINY, seed=3, image_size=64)
    assert corpus.pixels.shape == (12, 3, 64, 64) and corpus.pixels.dtype == torch.uint8
    assert torch.equal(corpus.pixels, again.pixels) and corpus.captions == again.captions
    assert torch.equal(corpus.caption_index, again.caption_index)
    assert len(set(corpus.identities)) == TINY.identities
    other = build_corpus(TINY, seed=4, image_size=64)
    assert not torch.equal(corpus.pixels, other.pixels)


def test_a_corpus_of_some_rows_holds_those_rows_of_the_whole():
    """A replay draws only the rows its batches take: the same pixels and captions, and a
    batch's distinct captions in the whole corpus's order."""
    whole = build_corpus(TINY, seed=3, image_size=64)
    rows = torch.tensor([7, 0, 11, 7, 4])
    some = build_corpus(TINY, seed=3, image_size=64, rows=rows)
    assert len(some.pixels) == 4 and some.size == whole.size == 12
    pixels, caption_index = some.take(rows)
    assert torch.equal(pixels, whole.take(rows)[0])
    assert [some.captions[k] for k in caption_index] == \
        [whole.captions[k] for k in whole.take(rows)[1]]
    assert torch.equal(torch.unique(caption_index, return_inverse=True)[1],
                       torch.unique(whole.take(rows)[1], return_inverse=True)[1])


def test_batch_order_is_seeded_and_batches_hold_distinct_images():
    first = [b.tolist() for b in batch_order(10, 4, 6, seed=1)]
    assert first == [b.tolist() for b in batch_order(10, 4, 6, seed=1)]
    assert first != [b.tolist() for b in batch_order(10, 4, 6, seed=2)]
    assert all(len(set(b)) == 4 for b in first)
    assert sorted(first[0] + first[1]) == sorted(set(first[0] + first[1]))  # one pass: no repeat


# ------------------------------------------------------------------ loss and loop
def test_contrastive_loss_is_clips_with_repeated_captions_merged():
    torch.manual_seed(0)
    images, texts = torch.randn(4, 8), torch.randn(4, 8)
    scale = torch.tensor(2.0)
    logits = scale.exp() * torch.nn.functional.normalize(images, dim=1) @ \
        torch.nn.functional.normalize(texts, dim=1).T
    labels = torch.arange(4)
    clip = (torch.nn.functional.cross_entropy(logits, labels)
            + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(contrastive_loss(images, texts, labels, scale), clip)
    # two images share caption 0: image->text has one target each, text 0 spreads over both
    shared = contrastive_loss(images, texts[:3], torch.tensor([0, 0, 1, 2]), scale)
    aligned = contrastive_loss(texts[[0, 0, 1, 2]] * 5, texts[:3], torch.tensor([0, 0, 1, 2]),
                               scale)
    assert torch.isfinite(shared) and aligned < shared


def test_a_small_run_lowers_the_contrastive_loss():
    recipe = dataclasses.replace(TINY, identities=8, images_per_identity=2, steps=12,
                                 batch_size=16, warmup_steps=2, lr=3e-3)
    corpus = build_corpus(recipe, seed=0, image_size=64)
    model = create_model("tiny-rn", seed=0)
    losses = train_contrastive(model, open_clip.get_tokenizer("tiny-rn"), corpus, recipe, seed=0,
                               channels_last=True)
    assert len(losses) == recipe.steps
    assert np.mean(losses[-5:]) < 0.8 * losses[0]


def test_same_seed_same_weights_and_the_global_rng_is_left_alone():
    def weights(seed):
        model, losses, _ = pretrain_module.pretrain_model("rn50", TINY, seed)
        return model.state_dict(), losses

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first, losses = weights(0)
    assert torch.equal(torch.rand(1), before)
    second, again = weights(0)
    assert losses == again
    assert all(torch.equal(first[k], second[k]) for k in first)
    third, _ = weights(1)
    assert not all(torch.equal(first[k], third[k]) for k in first)


# ------------------------------------------------------------------ cache
def test_the_cache_key_follows_the_recipe_seed_and_generator(monkeypatch, tmp_path):
    key = cache_key("tiny-rn", TINY, 0)
    assert key == cache_key("tiny-rn", dataclasses.replace(TINY), 0)
    changed = [cache_key("tiny-rn", dataclasses.replace(TINY, steps=3), 0),
               cache_key("tiny-rn", dataclasses.replace(TINY, caption_fields=("tone",)), 0),
               cache_key("tiny-rn", TINY, 1), cache_key("tiny-vit", TINY, 0)]
    assert key not in changed and len(set(changed)) == len(changed)
    monkeypatch.setattr(pretrain_module, "GENERATOR_VERSION", 999)
    assert cache_key("tiny-rn", TINY, 0) != key
    path = weights_path("rn50", tmp_path, 0, TINY)
    assert path.parent == tmp_path / "pretrained" and "tiny-rn" in path.name


def test_pretrain_builds_once_then_reuses_and_force_rebuilds(tmp_path):
    lines = []
    path = pretrain("rn50", tmp_path, progress=False, recipe=TINY, log=lines.append)
    assert path.is_file() and path.with_suffix(".json").is_file() and len(lines) == 1
    assert "pretraining the tiny rn50" in lines[0] and str(path) in lines[0]
    # built in a child process with the pinned numerics, whatever this x86-64 machine's CPU
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["torch_threads"] == BUILD_THREADS
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert record["cpu_capability"] == "AVX2"
    stamp = path.stat().st_mtime_ns
    assert pretrain("rn50", tmp_path, progress=False, recipe=TINY, log=lines.append) == path
    assert len(lines) == 1 and path.stat().st_mtime_ns == stamp
    pretrain("rn50", tmp_path, progress=False, recipe=TINY, log=lines.append, force=True)
    assert len(lines) == 2
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_pretrained_synthetic_builds_on_first_use_then_reuses(monkeypatch, tmp_path, capsys):
    use_recipe(monkeypatch, "rn50", TINY)
    backbone = create_backbone("rn50", "tiny", "synthetic", cache_dir=tmp_path)
    built = capsys.readouterr().err.splitlines()
    assert len([line for line in built if line.startswith("[model]")]) == 1
    path = weights_path("rn50", tmp_path, pretrain_module.SYNTHETIC_SEED, TINY)
    saved = torch.load(path, weights_only=True)
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float16}
    assert all(torch.equal(v, saved[k].to(v.dtype)) for k, v in backbone.clip.state_dict().items())
    create_backbone("rn50", "tiny", "synthetic", cache_dir=tmp_path)
    assert "[model]" not in capsys.readouterr().err
    # the file is an ordinary weights file too
    create_backbone("rn50", "tiny", str(path))
    with pytest.raises(ModelLoadError, match="synthetic exists only for the tiny profile"):
        create_backbone("rn50", "full", "synthetic", cache_dir=tmp_path)


def test_the_pretrain_verb_says_where_and_how_long(monkeypatch, tmp_path, capsys):
    use_recipe(monkeypatch, "rn50", TINY)
    argv = ["pretrain", "--backbone", "rn50", "--cache-dir", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr()
    path = weights_path("rn50", tmp_path, 0, TINY)
    assert f"rn50: synthetic pretrained tiny weights at {path} (" in out.out
    assert "[model] pretraining" in out.err
    assert main(argv) == 0
    assert "[model]" not in capsys.readouterr().err


def shipped_record(key: str) -> dict:
    """The JSON record written beside a packaged weights file."""
    return json.loads(pretrain_module.shipped_weights(key).with_suffix(".json").read_text())


# ------------------------------------------------------------------ the shipped weights
@pytest.mark.parametrize("key", ["vitb16", "rn50"])
def test_pretrained_synthetic_is_the_shipped_file_no_build(key, tmp_path, capsys):
    shipped = pretrain_module.shipped_weights(key)
    assert shipped is not None and shipped.name == weights_path(key, tmp_path).name
    assert shipped.stat().st_size <= 10 * 2**20
    record = shipped_record(key)
    assert record["recipe"] == json.loads(json.dumps(dataclasses.asdict(BACKBONES[key].recipe)))
    backbone = create_backbone(key, "tiny", "synthetic", cache_dir=tmp_path)
    assert "[model]" not in capsys.readouterr().err and not (tmp_path / "pretrained").exists()
    saved = torch.load(shipped, weights_only=True)
    assert all(torch.equal(v, saved[k].to(v.dtype)) for k, v in backbone.clip.state_dict().items())


REPLAY_STEPS = 80
"""Past RN50's warm-up (60 steps) into its cosine decay; inside the ViT's warm-up (1,000)."""


@pytest.mark.slow
@pytest.mark.parametrize("key", ["rn50", "vitb16"])
def test_the_first_steps_of_a_rebuild_reproduce_the_shipped_record(key):
    """A build's first steps, run as ``tune-clipfh pretrain`` runs them (pinned numerics, the
    recipe's whole schedule), give exactly the losses recorded when the packaged file was built:
    any change to the corpus, the captions, the model, the loss or the optimisation shows here
    (the whole build reproduces the packaged file tensor for tensor, in minutes to an hour;
    this replay draws only the images its batches take, in seconds)."""
    record = shipped_record(key)
    assert len(record["loss_curve"]) == record["recipe"]["steps"]
    assert record["loss_curve"][0] == record["loss_first"]
    replayed = pretrain_module.replay_first_steps(key, REPLAY_STEPS)
    assert replayed == record["loss_curve"][:REPLAY_STEPS]
