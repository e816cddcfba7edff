"""A training run on disk: the run folder, its files, and re-evaluation of a saved run.

Run folder layout::

    config.yaml          the resolved configuration
    metrics.jsonl        one JSON line per epoch (both stages)
    state.pt             resumable training state (every ``checkpoint_every`` epochs)
    best.pt              the best stage-2 weights + real epoch, metrics, config, backbone name
    test_results.json    10-split test: per split, mean and std
    test_results.csv     the same in the upstream column format (split1_R1 ... final_mAP)

Every file is written atomically (temporary file + rename), so an interrupted run never leaves a
half-written checkpoint, and every ``.pt`` loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig, build_config
from ..data.prepared import PreparedData, identity_set_for, load_prepared, resolve_data_dir
from ..errors import UserError
from ..evaluation import UPSTREAM_COLUMNS, upstream_table_row
from ..jsonable import jsonable
from ..model.registry import backbone_spec
from .stages import EpochRecord, Trainer, TrainResult

STATE_FILE = "state.pt"
BEST_FILE = "best.pt"


def atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    """Write through ``write(tmp_path)`` then rename over ``path`` (never a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_torch(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, lambda tmp: torch.save(payload, tmp))


def load_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_data(config: RunConfig, log: Callable[[str], None] = stderr_log,
                 progress: bool = True) -> PreparedData:
    """Resolve ``data_dir`` (synthesising the embedded default when absent) and load it."""
    data_dir = resolve_data_dir(config.data_dir, config.cache_dir, log=log)
    return load_data_for(config, data_dir, config.cache_dir, progress)


def load_data_for(config: RunConfig, data_dir: str | Path, cache_dir: str | None,
                  progress: bool = True) -> PreparedData:
    """A prepared folder as ``config`` trains on it: at its backbone's input size, with the
    identity set and validation fold it selects on; refused, before anything is decoded, when
    it was prepared for another ``dataset`` or ``aspect`` than ``config``'s."""
    # as-run selection on test split 1 trains on all training identities, as upstream did (B11)
    return load_prepared(data_dir, backbone_spec(config.model).input_size(config.profile),
                         cache_dir=cache_dir, progress=progress,
                         identity_set=identity_set_for(config.select_on),
                         val_fold=config.val_fold, dataset=config.dataset, aspect=config.aspect)


def best_checkpoint(trainer: Trainer) -> dict[str, Any]:
    """The best weights with what an audit needs (B16): real epoch, metrics, clean config."""
    best = trainer.selection.best
    return {
        "model": best["state"] or trainer.model_state(),
        "epoch": best["epoch"],
        "val_metrics": {"rank1": best["rank1"], "mAP": best["mAP"]},
        "config": trainer.config.to_dict(),
        "backbone": trainer.model.backbone.arch,
        "identities": list(trainer.data.identities),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_test_results(run_dir: Path, test: dict[str, Any], name: str) -> None:
    atomic_write_text(run_dir / "test_results.json", json.dumps(jsonable(test), indent=1))
    row = {"version": name, **upstream_table_row(test)}
    columns = ["version", *UPSTREAM_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerow(row)
    atomic_write_text(run_dir / "test_results.csv", buffer.getvalue())


def _keep_metrics_until(path: Path, iteration: int) -> None:
    """Keep the metrics rows of iterations up to ``iteration`` (the resumed checkpoint's)."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the interruption
        if isinstance(row, dict) and row.get("iteration", 0) <= iteration:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def train_run(config: RunConfig, run_dir: Path, *, resume: bool = False,
              log: Callable[[str], None] = stderr_log, progress: bool = True) -> TrainResult:
    """Train one configuration into ``run_dir`` (resuming from its state.pt if asked)."""
    started = time.perf_counter()
    data = prepare_data(config, log=log, progress=progress)
    trainer = Trainer(config, data, log=log, progress=progress)
    # Only once the data and the model load: a refused run leaves no empty run folder behind.
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / STATE_FILE
    if resume and state_path.is_file():
        trainer.load_state_dict(load_torch(state_path))
        log(f"[train] resumed from {state_path} ({trainer.stage} stage, "
            f"epoch {trainer.epoch_done} done)")
    atomic_write_text(run_dir / "config.yaml", config.to_yaml())
    metrics_path = run_dir / "metrics.jsonl"
    if not resume:
        metrics_path.unlink(missing_ok=True)
    elif metrics_path.is_file():
        # The epochs after the checkpoint run again: drop the rows they wrote before.
        _keep_metrics_until(metrics_path, trainer.iteration)
    best_epoch_saved = trainer.selection.best["epoch"]

    def on_epoch(record: EpochRecord) -> None:
        nonlocal best_epoch_saved
        with metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(jsonable({"stage": record.stage, "epoch": record.epoch,
                                              "iteration": record.iteration,
                                              **record.metrics})) + "\n")
        if trainer.selection.best["epoch"] != best_epoch_saved:
            save_torch(run_dir / BEST_FILE, best_checkpoint(trainer))
            best_epoch_saved = trainer.selection.best["epoch"]
        if record.iteration % config.checkpoint_every == 0:
            save_torch(state_path, trainer.state_dict())

    result = trainer.run(on_epoch)
    if result.test is not None:
        if trainer.selection.best["state"] is None:  # no image stage: the weights as trained
            save_torch(run_dir / BEST_FILE, best_checkpoint(trainer))
        write_test_results(run_dir, result.test, config.experiment)
    summary = {"status": result.status, "epochs_run": result.epochs_run,
               "best_epoch": result.best_epoch, "best_val": result.best_val,
               "diverged_at": result.diverged_at,
               "wall_time_s": time.perf_counter() - started}
    if result.test is not None:
        summary["test_mean"] = result.test["mean"]
        summary["test_std"] = result.test["std"]
    atomic_write_text(run_dir / "summary.json", json.dumps(jsonable(summary), indent=1))
    state_path.unlink(missing_ok=True)  # finished: the resumable state is no longer needed
    return result


def evaluate_run(run_dir: Path, log: Callable[[str], None] = stderr_log,
                 progress: bool = True) -> dict[str, Any]:
    """Reload a run's best checkpoint and evaluate it again on its 10 splits."""
    checkpoint_path = run_dir / BEST_FILE
    if not checkpoint_path.is_file():
        what = "has no best checkpoint" if run_dir.is_dir() else "does not exist"
        raise UserError(f"--run {run_dir}: the folder {what} ({BEST_FILE}; valid: a run "
                        f"folder written by tune-clipfh train, once it has a best epoch)")
    checkpoint = load_torch(checkpoint_path)
    config = build_config(checkpoint["config"], str(checkpoint_path)).config
    config.pretrained = "none"  # the weights come from the checkpoint
    data = prepare_data(config, log=log, progress=progress)
    trainer = Trainer(config, data, log=log, progress=progress)
    trainer.model.load_part_state(checkpoint["model"])
    return trainer.evaluator.test()


def zero_shot_run(config: RunConfig, out_dir: Path | None = None, *,
                  log: Callable[[str], None] = stderr_log,
                  progress: bool = True) -> dict[str, Any]:
    """The pretrained model as it is, no training: validation and the 10 test splits.

    With ``out_dir`` it writes ``test_results.json`` / ``.csv`` in a run's format, and a
    ``summary.json`` marked ``zero_shot``, so reports can draw it as a reference.
    """
    started = time.perf_counter()
    data = prepare_data(config, log=log, progress=progress)
    trainer = Trainer(config, data, log=log, progress=progress)
    val, test = trainer.evaluator.validate(), trainer.evaluator.test()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", config.to_yaml())
        write_test_results(out_dir, test, f"{config.experiment}-zero-shot")
        summary = {"status": "zero_shot", "zero_shot": True, "best_val": val,
                   "test_mean": test["mean"], "test_std": test["std"],
                   "wall_time_s": time.perf_counter() - started}
        atomic_write_text(out_dir / "summary.json", json.dumps(jsonable(summary), indent=1))
    return {"val": val, "test": test}


def result_lines(test: dict[str, Any]) -> list[str]:
    mean, std = test["mean"], test["std"]
    return [f"{k:7s} {mean[k] * 100:6.2f} +- {std[k] * 100:5.2f} %"
            for k in ("rank1", "rank5", "rank10", "mAP", "mINP") if k in mean]

