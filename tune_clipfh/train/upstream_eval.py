"""Re-evaluating the thesis's own Stage-2 checkpoints on a prepared dataset, under two protocols.

* ``correct``: our test, as for our own runs: the retrieval feature ``eval_feature`` (pre-BN
  image features by default), L2-normalised, ranked by ``eval_metric`` over the 10 splits.
* ``as_run``: the test behind the thesis's numbers (spec 4.1, B12): (normalised image feature +
  upstream's constant SOS text vector) / 2, not re-normalised, ranked by dot product. The test
  inputs are CLIP-normalised in both, as upstream's were (B1 concerns training only).

Output folder: ``upstream_eval.json`` (what was loaded, both protocols' means), ``config.yaml``,
and ``correct/`` and ``as_run/`` each with ``test_results.json`` / ``.csv`` in a run's format.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import UserError
from ..jsonable import jsonable
from ..model.upstream import (
    UpstreamCheckpoint,
    load_into,
    read_upstream_checkpoint,
    sos_text_feature,
)
from .run import atomic_write_text, prepare_data, stderr_log, write_test_results
from .stages import Trainer

PROTOCOLS = ("correct", "as_run")
SUMMARY_FILE = "upstream_eval.json"
NO_PROJ = ("the constant text vector goes through the prompt learner's proj (text width -> "
           "image width), which only the prompt file holds; without it upstream's evaluation "
           "drew a fresh, unseeded proj, so its fused test cannot be replayed")


def evaluate_upstream(config: RunConfig, checkpoint_path: Path, out_dir: Path, *,
                      log: Callable[[str], None] = stderr_log,
                      progress: bool = True) -> dict[str, Any]:
    """Load an upstream checkpoint into ``config``'s model, test it under both protocols and
    write the results into ``out_dir``; returns the description and each protocol's test
    (``as_run`` None, with ``as_run_skipped`` saying why, when it cannot be rebuilt)."""
    if config.profile != "full":
        raise UserError(f"profile: {config.profile}: the thesis's checkpoints are full-size "
                        f"models (valid: full)")
    if config.eval_fusion != "none":
        raise UserError("eval_fusion: an upstream evaluation writes both protocols, the fused "
                        "one under as_run/ (valid here: none)")
    checkpoint = read_upstream_checkpoint(checkpoint_path, config.model)
    log(checkpoint.describe())
    config = dataclasses.replace(config, pretrained="none")  # the weights come from the file
    data = prepare_data(config, log=log, progress=progress)
    trainer = Trainer(config, data, log=log, progress=progress)
    load_into(checkpoint, trainer.model.backbone, trainer.model.head.bnneck)
    result = {"description": checkpoint.describe(), **_both_protocols(trainer, checkpoint)}
    _write(out_dir, config, checkpoint, result)
    return result


def _both_protocols(trainer: Trainer, checkpoint: UpstreamCheckpoint) -> dict[str, Any]:
    """The image features are extracted once and ranked both ways."""
    config, evaluator = trainer.config, trainer.evaluator
    rows = trainer.data.test_rows
    image = evaluator.extract(rows).cpu()
    correct = evaluator.rank_test(image, config.eval_metric)
    text = sos_text_feature(checkpoint, trainer.model.backbone)
    if text is None:
        return {"correct": correct, "as_run": None, "as_run_skipped": NO_PROJ}
    # upstream fused its pre-BN image feature, whatever eval_feature the correct test uses
    pre_bn = image if config.eval_feature == "pre_bn" else evaluator.extract(rows, "pre_bn")
    fused = (pre_bn.cpu() + text) / 2
    return {"correct": correct, "as_run": evaluator.rank_test(fused, "dot"),
            "as_run_skipped": None}


def _write(out_dir: Path, config: RunConfig, checkpoint: UpstreamCheckpoint,
           result: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", config.to_yaml())
    summary: dict[str, Any] = {"checkpoint": str(checkpoint.path),
                               "prompt_file": str(checkpoint.prompt_path)
                               if checkpoint.prompt is not None else None,
                               "backbone": checkpoint.backbone, "epoch": checkpoint.epoch,
                               "description": result["description"]}
    for protocol in PROTOCOLS:
        test = result[protocol]
        if test is None:
            summary[protocol] = {"skipped": result["as_run_skipped"]}
            continue
        write_test_results(out_dir / protocol, test, f"{config.experiment}-{protocol}")
        summary[protocol] = {"test_mean": test["mean"], "test_std": test["std"]}
    atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(jsonable(summary), indent=1))


def upstream_checkpoint_path(model_path: object, checkpoint: str | None, source: str) -> Path:
    """``--checkpoint`` if given, else the eval file's ``model_path`` (relative to the current
    folder, as upstream's run_eval_clip.py read it)."""
    if checkpoint:
        return Path(checkpoint)
    if not isinstance(model_path, str) or not model_path:
        raise UserError(f"{source}: no model_path to evaluate (give --checkpoint FILE)")
    if not Path(model_path).is_file():
        raise UserError(f"{source}: key 'model_path': {model_path} not found from the current "
                        f"folder {Path.cwd()} (run from upstream's repository root, as its "
                        f"run_eval_clip.py was, or give --checkpoint FILE)")
    return Path(model_path)
