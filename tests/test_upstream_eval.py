"""`tune-clipfh eval` on the thesis's own checkpoints (upstream layout, built here from
random full-size weights: no download), and eval's refusals as one `error:` line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from tune_clipfh.cli import main
from tune_clipfh.config import build_config, read_yaml
from tune_clipfh.data.hands11k import prepare_11k
from tune_clipfh.data.synth import synthesize
from tune_clipfh.model.backbone import ClipBackbone
from tune_clipfh.model.errors import ModelLoadError
from tune_clipfh.model.registry import BACKBONES
from tune_clipfh.model.upstream import (
    Unread,
    UpstreamCheckpoint,
    load_into,
    load_weights_only,
    prompt_file_for,
    sos_text_feature,
)
from tune_clipfh.train.upstream_eval import PROTOCOLS, SUMMARY_FILE, evaluate_upstream


@pytest.mark.parametrize("what", ["missing", "no best.pt"])
def test_eval_run_without_a_best_checkpoint_is_one_error_line(what, tmp_path, capsys):
    run = tmp_path / "run"
    if what == "no best.pt":
        run.mkdir()
        (run / "config.yaml").write_text("model: rn50\n")
    assert main(["eval", "--run", str(run)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    reason = "does not exist" if what == "missing" else "has no best checkpoint"
    assert captured.err.startswith(f"error: --run {run}: the folder {reason} (best.pt; ")


# --- checkpoints in upstream's layout --------------------------------------------------------
SEED_EVAL = (Path(__file__).parent / "fixtures" / "upstream" / "d0f5b4b" / "configs"
             / "eval_stage2_clip_reid" / "eval_joint_vitb16_11k_dorsal_r.yml")
ARCH = {"vitb16": "ViT-B-16", "rn50": "RN50"}
UPSTREAM_N_CTX = 12  # every thesis version (spec 2.2)


@pytest.fixture(scope="module")
def data_224(tmp_path_factory):
    """The smallest prepared set the 11k protocol allows: 8 identities x 2 images, so the 10
    test splits rank 8 images (full-size forward passes cost ~1 s an image on these CPUs)."""
    root = tmp_path_factory.mktemp("upstream-224")
    synthesize(root / "src", identities=8, images_per_identity=2, seed=5, progress=False)
    prepare_11k(root / "src", "dorsal_r", root / "prepared", progress=False)
    return root / "prepared"


@pytest.fixture(scope="module")
def clips():
    """Full-size random-init CLIP models, built once each (no download)."""
    built = {}

    def get(backbone: str) -> open_clip.CLIP:
        if backbone not in built:
            torch.manual_seed(0)
            built[backbone] = open_clip.create_model(ARCH[backbone], force_quick_gelu=True)
        return built[backbone]
    return get


def upstream_prompt_state(clip: open_clip.CLIP, backbone: str) -> dict[str, torch.Tensor]:
    """What upstream's PromptLearner.state_dict() holds (engine/prompt_learner.py)."""
    ids = open_clip.tokenize(["A photo of {}'s {aspect} hand for identification."])
    with torch.no_grad():
        embedded = clip.token_embedding(ids)
    state = {"cls_ctx": torch.empty(72, UPSTREAM_N_CTX, 512).uniform_(-0.02, 0.02),
             "token_prefix": embedded[:, :UPSTREAM_N_CTX + 1],
             "token_suffix": embedded[:, 2 * UPSTREAM_N_CTX + 1:]}
    if backbone == "rn50":  # Linear(512 -> 1024): text width to the image feature's
        proj = torch.nn.Linear(512, 1024)
        state.update({"proj.weight": proj.weight.detach(), "proj.bias": proj.bias.detach()})
    return state


class CombinedLoss(torch.nn.Module):
    """Stands for upstream's loss object, pickled into the checkpoint's config (B16)."""

    def __init__(self):
        super().__init__()
        self.cross_entropy = torch.nn.CrossEntropyLoss()


UNREAD = "pickled test_upstream_eval.CombinedLoss, torch.nn.modules.loss.CrossEntropyLoss " \
         "not run (placeholders)"


def write_upstream_checkpoint(clip: open_clip.CLIP, backbone: str, path: Path,
                              prompt: bool) -> Path:
    """save_checkpoint's layout: CLIP + the heads registered on it, wrapped with epoch, config
    and metadata; fp16, as a half-precision save would hold it."""
    dim = clip.text_projection.shape[1]
    bottleneck = torch.nn.BatchNorm1d(dim)
    bottleneck.running_mean.normal_()
    heads = {**{f"bottleneck.{k}": v for k, v in bottleneck.state_dict().items()},
             "arcface.weight": torch.randn(72, dim), "classifier.weight": torch.randn(72, dim),
             "classifier.bias": torch.zeros(72)}
    state = {k: v.half() if v.is_floating_point() else v
             for k, v in {**clip.state_dict(), **heads}.items()}
    torch.save({"epoch": 30, "model_state_dict": state, "loss": None,
                "config": {"model": backbone, "n_ctx": UPSTREAM_N_CTX,
                           "loss_fn": CombinedLoss()},
                "metadata": {"clip_variant": "ViT-B/16", "stage": "image"}}, path)
    if prompt:
        torch.save(upstream_prompt_state(clip, backbone), prompt_file_for(path))
    return path


def test_vitb16_checkpoint_with_its_prompt_file_is_evaluated_under_both_protocols(
        clips, data_224, tmp_path, monkeypatch, capsys):
    # model_path as the eval file names it, read from the current folder as upstream read it
    model_path = read_yaml(SEED_EVAL)["model_path"]
    (tmp_path / model_path).parent.mkdir(parents=True)
    write_upstream_checkpoint(clips("vitb16"), "vitb16", tmp_path / model_path, prompt=True)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["eval", "--upstream-config", str(SEED_EVAL), "--data", str(data_224),
                 "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    described = [line for line in captured.err.splitlines() if "upstream checkpoint" in line]
    assert described == [f"upstream checkpoint {model_path}: vitb16 (ViT-B-16), epoch 30 as "
                         f"stored, {len(clips('vitb16').state_dict())} CLIP tensors; bottleneck "
                         f"-> BNNeck (used by eval_feature: post_bn); arcface, classifier "
                         f"ignored (ID heads, not used at test); prompt file "
                         f"{Path(model_path).stem}_prompt.pth; {UNREAD}"]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    for protocol in PROTOCOLS:
        tested = json.loads((out / protocol / "test_results.json").read_text())
        assert len(tested["per_split"]) == 10
        assert summary[protocol]["test_mean"] == pytest.approx(tested["mean"])
        row = (out / protocol / "test_results.csv").read_text().splitlines()
        assert row[1].startswith(f"eval_stage2_joint_vitb16_11k_dorsal_r-{protocol},")
        assert f"{protocol}: test, mean +- std over 10 splits:" in captured.out
    assert summary["epoch"] == 30 and summary["prompt_file"].endswith("_prompt.pth")


def test_rn50_checkpoint_without_prompt_file_tests_correctly_and_says_why_not_as_run(
        clips, data_224, tmp_path):
    checkpoint = write_upstream_checkpoint(clips("rn50"), "rn50", tmp_path / "rn50_BEST.pth",
                                           prompt=False)
    config = build_config({"model": "rn50", "data_dir": str(data_224), "device": "cpu",
                           "select_on": "test_split0"}, "test").config
    result = evaluate_upstream(config, checkpoint, tmp_path / "out", log=lambda _: None,
                               progress=False)
    assert result["description"].endswith(f"; no prompt file (rn50_BEST_prompt.pth absent); {UNREAD}")
    assert result["as_run"] is None and "only the prompt file holds" in result["as_run_skipped"]
    assert not (tmp_path / "out" / "as_run").exists()
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert summary["as_run"] == {"skipped": result["as_run_skipped"]}


def upstream_sos_feature(clip: open_clip.CLIP, prompt: dict) -> torch.Tensor:
    """engine/baseline_inference.py's text feature, on the whole 77-token prompt."""
    prompts = torch.cat([prompt["token_prefix"], prompt["cls_ctx"][:1],
                         prompt["token_suffix"]], dim=1)
    x = clip.transformer(prompts + clip.positional_embedding, attn_mask=clip.attn_mask)
    text = F.normalize(clip.ln_final(x[:, 0]), dim=1)
    if "proj.weight" in prompt:
        text = F.normalize(F.linear(text, prompt["proj.weight"], prompt["proj.bias"]), dim=1)
    return text


@pytest.mark.parametrize("backbone", ["vitb16", "rn50"])
def test_the_as_run_text_vector_is_upstreams_with_or_without_the_prompt_file(backbone, clips):
    clip = clips(backbone)
    prompt = upstream_prompt_state(clip, backbone)
    spec = BACKBONES[backbone]
    wrapped = ClipBackbone(clip, spec, "full")
    checkpoint = UpstreamCheckpoint(path=Path("c.pth"), backbone=backbone, epoch=30,
                                    clip_state={}, bottleneck={}, ignored=[],
                                    prompt_path=Path("c_prompt.pth"), prompt=prompt)
    with torch.no_grad():
        expected = upstream_sos_feature(clip, prompt)
        assert torch.allclose(sos_text_feature(checkpoint, wrapped), expected, atol=1e-5)
        checkpoint.prompt = None  # ViT: the SOS embedding alone; RN50: proj is lost
        without = sos_text_feature(checkpoint, wrapped)
    if backbone == "vitb16":
        assert torch.allclose(without, expected, atol=1e-5)
    else:
        assert without is None


# --- refusals: one line naming the file and what was expected --------------------------------
def fake_vit_signature() -> dict[str, torch.Tensor]:
    return {"visual.conv1.weight": torch.zeros(768, 3, 16, 16),
            "text_projection": torch.zeros(512, 512)}


REFUSED = {
    "text file": (lambda p: p.write_text("model: vitb16\n"), "not a torch checkpoint ("),
    "plain tensor": (lambda p: torch.save(torch.zeros(3), p),
                     "holds a Tensor, expected upstream's Stage-2 checkpoint"),
    "no model_state_dict": (lambda p: torch.save({"epoch": 3, "state_dict": {}}, p),
                            "holds a dict with keys ['epoch', 'state_dict'], expected"),
    "bare state dict": (lambda p: torch.save(fake_vit_signature(), p),
                        "(a bare CLIP state dict is a weights file: set pretrained: FILE)"),
    "torchscript": (lambda p: torch.jit.script(torch.nn.Identity()).save(str(p)),
                    "a TorchScript archive, not a checkpoint"),
    "a blocked module's function": (
        lambda p: torch.save({"model_state_dict": {}, "hook": RunsCode(os.system, p)}, p),
        f"holds pickled objects weights-only loading refuses ({os.system.__module__}.system): "
        f"UnpicklingError"),
    "other backbone": (lambda p: torch.save({"model_state_dict": fake_vit_signature()}, p),
                       "holds a vitb16 backbone but the config says model: rn50 (set model: "
                       "vitb16)"),
}


def touch(path: str) -> None:
    Path(path).touch()


class RunsCode:
    """A pickle whose loading calls a function of the file's choice, with its arguments."""

    def __init__(self, function, marker: Path):
        self.function, self.marker = function, marker

    def __reduce__(self):
        return self.function, (str(self.marker),)


def test_a_pickled_object_is_read_as_data_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "c.pth"
    torch.save({"model_state_dict": {"x": torch.ones(2)}, "config": {"hook": RunsCode(touch, marker)}},
               path)
    loaded, unread = load_weights_only(path, "checkpoint")
    assert unread == ["test_upstream_eval.touch"] and not marker.exists()
    assert isinstance(loaded["config"]["hook"], Unread)
    assert loaded["config"]["hook"].args == (str(marker),)
    assert torch.equal(loaded["model_state_dict"]["x"], torch.ones(2))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("what", sorted(REFUSED))
def test_a_file_that_is_no_upstream_checkpoint_is_one_error_line(what, tmp_path, capsys):
    write, expected = REFUSED[what]
    path = tmp_path / "c.pth"
    write(path)
    argv = ["eval", "--upstream-config", str(SEED_EVAL), "--checkpoint", str(path)]
    assert main(argv + (["--set", "model=rn50"] if what == "other backbone" else [])) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if not line.startswith("note: ")]
    assert captured.out == "" and len(errors) == 1
    assert errors[0].startswith(f"error: checkpoint {path}: ") and expected in errors[0]


def test_a_checkpoint_that_does_not_fit_its_architecture_names_the_keys(clips):
    state = dict(clips("rn50").state_dict())
    del state["visual.attnpool.c_proj.bias"]
    checkpoint = UpstreamCheckpoint(path=Path("c.pth"), backbone="rn50", epoch=30,
                                    clip_state=state, bottleneck={}, ignored=[],
                                    prompt_path=Path("c_prompt.pth"), prompt=None)
    backbone = ClipBackbone(clips("rn50"), BACKBONES["rn50"], "full")
    with pytest.raises(ModelLoadError, match=r"^checkpoint c.pth: does not fit the RN50 "
                       r"architecture: missing keys 1 \(e.g. visual.attnpool.c_proj.bias\)$"):
        load_into(checkpoint, backbone, torch.nn.BatchNorm1d(1024))


@pytest.mark.parametrize("argv, expected", [
    (["--checkpoint", "c.pth", "--run", "r"], "--checkpoint and --data go with --upstream-"),
    (["--upstream-config", str(SEED_EVAL), "--run", "r"], "eval takes --run DIR"),
    (["--upstream-config", str(SEED_EVAL)], f"{SEED_EVAL}: key 'model_path': saved_models/"),
])
def test_eval_options_that_do_not_go_together_are_one_error_line(argv, expected, capsys):
    assert main(["eval", *argv]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines()
              if not line.startswith("note: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {expected}")
