"""The Ray Tune function trainable: a thin adapter from the training core to ``tune.report``.

Per epoch it reports the core's metrics (losses, every group's rate, validation Rank-1/mAP and
their running best, epoch time) and, every ``checkpoint_every`` epochs, a checkpoint holding the
whole training state; on restart it resumes from ``tune.get_checkpoint()``. A last row carries the
10-split test metrics as ``test_*`` columns, the run's ``status`` and ``final = 1`` (a trial
without that row was stopped by the scheduler). ``image_epoch`` counts image-stage epochs (0 in
the prompt stage): ASHA compares trials on it, so trials with prompt stages of different
lengths meet at the same point of their image stage. Every row says where the trial runs: ``device``
(``cpu``, ``cuda:0``), ``gpu_name`` and ``gpu_ids`` (the node's cards Ray gave it).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from ..config import ConfigError, build_config
from ..train.evaluate import EXPECTED_METRICS
from ..train.run import load_data_for, load_torch, save_torch
from ..train.stages import DeviceUnavailable, EpochRecord, Trainer, TrainResult, pick_device

STATE_FILE = "state.pt"
META_KEYS = ("version", "backbone", "kind", "thesis_run", "behaviour", "ablation", "race_of")
"""Trial-config keys that describe the trial rather than configure training."""
NO_SCORE = {f"best_val_{name}": 0.0 for name in ("rank1", "mAP", *EXPECTED_METRICS)}
"""The scores of a trial that could not train (the searcher learns to avoid its region)."""


def trial_knobs(trial_config: dict[str, Any], base_knobs: dict[str, Any]) -> dict[str, Any]:
    """Base knobs, then a fixed trial's knobs (``fixed``), then searched values, then the seed."""
    knobs = dict(base_knobs)
    fixed = trial_config.get("fixed") or {}
    knobs.update({k: v for k, v in fixed.items() if k not in META_KEYS})
    knobs.update({k: v for k, v in trial_config.items() if k != "fixed" and k not in META_KEYS})
    return knobs


def test_columns(test: dict[str, Any] | None) -> dict[str, float]:
    """``test_rank1``, ``test_rank1_std``, ..., ``test_cmc_<k>``, ``test_split<i>_rank1``."""
    if test is None:
        return {}
    columns: dict[str, float] = {}
    for key, value in test["mean"].items():
        columns[f"test_{key}"] = float(value)
        columns[f"test_{key}_std"] = float(test["std"][key])
    for rank, value in enumerate(test["cmc_mean"][:20], start=1):
        columns[f"test_cmc_{rank}"] = float(value)
    for index, split in enumerate(test["per_split"], start=1):
        for key in ("rank1", "rank5", "rank10", "mAP"):
            columns[f"test_split{index}_{key}"] = float(split[key])
    return columns


def stage_seconds(history: list[dict[str, Any]]) -> dict[str, float]:
    """``prompt_seconds`` and ``image_seconds``: each stage's summed epoch times (what a
    search's budget learns a trial's cost from)."""
    totals = {"prompt_seconds": 0.0, "image_seconds": 0.0}
    for row in history:
        totals[f"{row['stage']}_seconds"] += float(row.get("epoch_time_s", 0.0))
    return totals


def device_columns(device: torch.device | None) -> dict[str, str]:
    """``device`` (``cpu``, ``cuda:0``, ``none``), ``gpu_name`` and ``gpu_ids`` (the node's
    cards Ray assigned to the trial) of a trial running on ``device``."""
    gpu_ids = ",".join(str(i) for i in ray.get_gpu_ids())
    if device is None or device.type != "cuda":
        return {"device": "none" if device is None else "cpu", "gpu_name": "",
                "gpu_ids": gpu_ids}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"device": f"cuda:{index}", "gpu_name": torch.cuda.get_device_name(index),
            "gpu_ids": gpu_ids}


def clipfh_trainable(trial_config: dict[str, Any], *, base_knobs: dict[str, Any],
                     data_dir: str, cache_dir: str | None = None) -> None:
    """Train one trial and report each epoch to Tune."""
    knobs = trial_knobs(trial_config, base_knobs)
    try:
        config = build_config(knobs, source=f"trial {tune.get_context().get_trial_name()}").config
    except ConfigError as exc:
        # A sampled combination the schema refuses (e.g. every loss off): record it, scored 0,
        # so the searcher learns to avoid it and the experiment goes on.
        tune.report({"final": 1, "status": "invalid_config", "error": str(exc), **NO_SCORE})
        return
    try:
        device = pick_device(config.device)
    except DeviceUnavailable as exc:
        # device: cuda, but Ray gave the trial no card (or the node's CUDA is broken): recorded
        # as such, never run on the CPU instead.
        tune.report({"final": 1, "status": "device_unavailable", "error": str(exc),
                     **device_columns(None), **NO_SCORE})
        return
    where = device_columns(device)
    # A trial's torch threads follow the CPUs Ray gave it (Ray sets OMP_NUM_THREADS).
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    data = load_data_for(config, data_dir, cache_dir, progress=False)
    where = {**where, "identity_set": data.manifest.identity_set,
             "train_identities": len(data.identities)}
    trainer = Trainer(config, data, log=lambda line: print(line, flush=True), progress=False,
                      device=device)
    _resume(trainer)
    node_id = ray.get_runtime_context().get_node_id()
    last_checkpoint = time.monotonic()

    def on_epoch(record: EpochRecord) -> None:
        nonlocal last_checkpoint
        metrics = {**record.metrics, "stage": record.stage, "stage_epoch": record.epoch,
                   "image_epoch": record.epoch if record.stage == "image" else 0,
                   "epoch": record.iteration, "final": 0, "node_id": node_id, **where}
        due = record.iteration % config.checkpoint_every == 0 and \
            time.monotonic() - last_checkpoint >= config.checkpoint_min_interval_s
        if not due:
            tune.report(metrics)
            return
        last_checkpoint = time.monotonic()
        with tempfile.TemporaryDirectory() as folder:
            save_torch(Path(folder) / STATE_FILE, trainer.state_dict())
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    tune.report(final_row(trainer.run(on_epoch), {"node_id": node_id, **where}))


def _resume(trainer: Trainer) -> None:
    """Continue from the trial's checkpoint, if Tune restored one."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as folder:
        trainer.load_state_dict(load_torch(Path(folder) / STATE_FILE))
    if trainer.fault is not None and trainer.fault[0] == "raise":
        trainer.fault = None  # an injected crash happens once; the retry must get past it
    print(f"[trial] resumed at {trainer.stage} stage, epoch {trainer.epoch_done}", flush=True)


def final_row(result: TrainResult, where: dict[str, Any]) -> dict[str, Any]:
    """A trial's last report: its last epoch's row, the kept epoch's validation, the test."""
    last = dict(result.history[-1]) if result.history else {}
    last.pop("stage", None)
    # History rows count epochs within a stage; reported rows use the overall count as `epoch`.
    if last:
        last["stage_epoch"], last["epoch"] = last["epoch"], last.pop("iteration")
    selected = result.best_epoch is not None  # else no stage-2 epoch: the last row's values
    final = {**last, "status": result.status, "final": 1, **where,
             "best_epoch": result.best_epoch if selected else -1,
             "best_val_rank1": result.best_val["rank1"] if selected else last.get(
                 "best_val_rank1", 0.0),
             "best_val_mAP": result.best_val["mAP"] if selected else last.get(
                 "best_val_mAP", 0.0),
             **{f"best_val_{name}": result.best_val[name] if selected else last.get(
                 f"best_val_{name}", 0.0) for name in EXPECTED_METRICS},
             "epochs_prompt_run": result.epochs_run["prompt"],
             "epochs_image_run": result.epochs_run["image"],
             "image_epoch": result.epochs_run["image"],
             **stage_seconds(result.history),
             **test_columns(result.test)}
    if result.diverged_at is not None:
        final["diverged_stage"] = result.diverged_at["stage"]
        final["diverged_epoch"] = result.diverged_at["epoch"]
    return final
