"""The verbs of the command line, one function each: arguments in, one call to a layer, the
result printed. The parser that dispatches to them is :mod:`.cli`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import ConfigError, describe_keys, load_config, parse_overrides, read_yaml
from .errors import UserError
from .extras import require
from .model.registry import THESIS_BACKBONES
from .resources import config_file


def cmd_data_synth(args: argparse.Namespace) -> int:
    from .data.synth import synthesize

    started = time.perf_counter()
    out = synthesize(args.out, identities=args.identities,
                     images_per_identity=args.images_per_identity, seed=args.seed)
    print(f"synthetic dataset written to {out} ({time.perf_counter() - started:.1f}s)")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    common = dict(seed=args.seed, identity_split=args.identity_split,
                  val_fraction=args.val_fraction, num_splits=args.num_splits,
                  identity_set=args.identity_set)
    if args.dataset == "11k":
        from .data.hands11k import prepare_11k

        manifest = prepare_11k(args.src, args.aspect, args.out,
                               cross_aspect_gallery=args.cross_aspect_gallery, **common)
    else:
        from .data.hd import prepare_hd

        manifest = prepare_hd(args.src, args.out, **common)
    print(f"{len(manifest.train)} train images; manifest written to "
          f"{Path(args.out) / 'manifest.json'}")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    loaded = load_config(config_file(args.file), args.set)
    for note in loaded.notes:
        print(f"note: {note}", file=sys.stderr)
    print(loaded.config.to_yaml(), end="")
    print(f"# {args.file}: valid", file=sys.stderr)
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    print(describe_keys())
    return 0


def _run_folder(out: str | None, output_dir: str, experiment: str) -> Path:
    if out:
        return Path(out)
    return Path(output_dir) / f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_train(args: argparse.Namespace) -> int:
    from .train.run import result_lines, train_run

    if args.mlflow:
        require("mlflow")  # before training, not after it
    if args.resume:
        run_dir = Path(args.resume)
        loaded = load_config(run_dir / "config.yaml", args.set)
    else:
        loaded = load_config(args.config, args.set)
        run_dir = _run_folder(args.out, loaded.config.output_dir, loaded.config.experiment)
    for note in loaded.notes:
        print(f"note: {note}", file=sys.stderr)
    started = time.perf_counter()
    result = train_run(loaded.config, run_dir, resume=bool(args.resume),
                       progress=not args.no_progress)
    wall = time.perf_counter() - started
    print(f"run folder: {run_dir}")
    if args.mlflow:
        from .tune.tracking import track_run_folder

        print(f"MLflow run {track_run_folder(args.mlflow, run_dir)} at {args.mlflow}")
    print(f"status: {result.status}; epochs run: {result.epochs_run}; wall time {wall:.1f}s")
    if result.best_epoch is not None:
        print(f"best validation (stage-2 epoch {result.best_epoch}): "
              f"Rank-1 {result.best_val['rank1'] * 100:.2f} %, "
              f"mAP {result.best_val['mAP'] * 100:.2f} %")
    if result.test is not None:
        print(f"test, mean +- std over {len(result.test['per_split'])} splits:")
        for line in result_lines(result.test):
            print(f"  {line}")
    if result.status == "diverged":
        print(f"diverged at {result.diverged_at}")
        return 3
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .jsonable import jsonable
    from .train.run import evaluate_run, result_lines, zero_shot_run

    modes = [bool(args.run), bool(args.zero_shot or args.config), bool(args.upstream_config)]
    zero_shot_call = args.zero_shot and args.config and sum(modes) == 1
    run_call = args.run and sum(modes) == 1
    upstream_call = args.upstream_config and sum(modes) == 1
    if (args.checkpoint or args.data) and not upstream_call:
        raise UserError("--checkpoint and --data go with --upstream-config FILE")
    if not (zero_shot_call or run_call or upstream_call):
        raise UserError("eval takes --run DIR (a trained run), --config FILE --zero-shot "
                        "(the pretrained model without training), or --upstream-config FILE "
                        "[--checkpoint FILE] (a checkpoint of the thesis)")
    if upstream_call:
        return _eval_upstream(args)
    if args.zero_shot:
        config = load_config(config_file(args.config), args.set).config
        out = Path(args.out) if args.out else None
        result = zero_shot_run(config, out, progress=not args.no_progress)
        test, val = result["test"], result["val"]
    else:
        test, val = evaluate_run(Path(args.run), progress=not args.no_progress), None
    if args.json:
        print(json.dumps(jsonable({"val": val, "mean": test["mean"], "std": test["std"]}),
                         indent=1))
        return 0
    if val is not None:
        print(f"validation: Rank-1 {val['rank1'] * 100:.2f} %, mAP {val['mAP'] * 100:.2f} %")
    print(f"test, mean +- std over {len(test['per_split'])} splits:")
    for line in result_lines(test):
        print(f"  {line}")
    return 0


def _eval_upstream(args: argparse.Namespace) -> int:
    from .jsonable import jsonable
    from .train.run import result_lines
    from .train.upstream_eval import PROTOCOLS, evaluate_upstream, upstream_checkpoint_path

    loaded = load_config(args.upstream_config, args.set,
                         extra={"data_dir": args.data} if args.data else None)
    for note in loaded.notes:
        print(f"note: {note}", file=sys.stderr)
    config = loaded.config
    checkpoint = upstream_checkpoint_path(read_yaml(args.upstream_config).get("model_path"),
                                          args.checkpoint, args.upstream_config)
    out = _run_folder(args.out, config.output_dir, config.experiment)
    result = evaluate_upstream(config, checkpoint, out, progress=not args.no_progress)
    if args.json:
        print(json.dumps(jsonable({p: None if result[p] is None else
                                   {"mean": result[p]["mean"], "std": result[p]["std"]}
                                   for p in PROTOCOLS}), indent=1))
        return 0
    for protocol in PROTOCOLS:
        test = result[protocol]
        if test is None:
            print(f"{protocol}: not evaluated: {result['as_run_skipped']}")
            continue
        print(f"{protocol}: test, mean +- std over {len(test['per_split'])} splits:")
        for line in result_lines(test):
            print(f"  {line}")
    print(f"results folder: {out}")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    from .tune.versions import VERSIONS_AS_RUN_FILE, format_versions, load_versions

    resolved = load_versions(VERSIONS_AS_RUN_FILE if args.as_run else None, profile=args.profile)
    backbones = [args.backbone] if args.backbone else list(resolved)
    chosen = []
    for backbone in backbones:
        if backbone not in resolved:
            raise ConfigError(f"--backbone: {backbone} has no thesis versions (defined: "
                              f"{', '.join(resolved)})")
        versions = resolved[backbone]
        if args.version and args.version not in versions:
            raise ConfigError(f"--version: {args.version!r} is not defined for {backbone} "
                              f"(valid: {', '.join(versions)})")
        chosen += [v for name, v in versions.items() if not args.version or name == args.version]
    print(format_versions(chosen, args.format))
    return 0


def _experiment_options(args: argparse.Namespace):
    from .tune.experiment import ExperimentOptions

    if args.mlflow:
        require("mlflow")  # before Ray starts
    return ExperimentOptions(
        name=args.name, storage=args.storage, profile=args.profile, seeds=args.seeds,
        data=args.data, cache_dir=args.cache_dir, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent,
        address=args.address, resume=args.resume, max_failures=args.max_failures,
        overrides=parse_overrides(args.set), mlflow=args.mlflow)


def _finish_experiment(path: Path, started: float, verb: str, mlflow: str | None) -> int:
    """Summarise an experiment (with ``mlflow``, its report goes to the tracker too); an
    interrupted one says how to resume it and exits 130."""
    from .tune.results import load_results, summarize_experiment

    print(summarize_experiment(path))
    if mlflow:
        _track_report(path, mlflow)
    print(f"experiment folder: {path} ({time.perf_counter() - started:.0f}s)")
    frame = load_results(path)
    unfinished = int((frame["status"] == "unfinished").sum()) if not frame.empty else 0
    if unfinished:
        print(f"{unfinished} trials unfinished: continue with `tune-clipfh {verb} --resume "
              f"--name {path.name} --storage {path.parent}` (same other options)",
              file=sys.stderr)
        return 130
    return 0


def _track_report(path: Path, uri: str) -> None:
    """The experiment's report, written into ``<experiment>/report``, as the artifacts of its
    MLflow parent run."""
    from .report import build_report
    from .tune.tracking import log_experiment_artifacts

    page = build_report([path], path / "report", log=lambda line: print(line, file=sys.stderr))
    log_experiment_artifacts(uri, path, page.parent)
    print(f"MLflow experiment {path.name} at {uri}: one run per trial, the report as the "
          f"artifacts of its parent run")


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .tune.experiment import reproduce

    started = time.perf_counter()
    path = reproduce(_split(args.backbones), _split(args.versions) or None,
                     _experiment_options(args), as_run=args.as_run)
    return _finish_experiment(path, started, "reproduce", args.mlflow)


def cmd_ablate(args: argparse.Namespace) -> int:
    """The bug ablation of one version, or with ``--toward`` the path from it to a config file;
    ``--summary`` prints the table of a path ablation already run."""
    if args.summary:
        if args.toward or args.direction:
            raise UserError("--summary prints the table of an experiment already run: it takes "
                            "no --toward or --direction")
        from .tune.ablation import ablation_summary

        print(ablation_summary(args.summary))
        return 0
    if args.direction and not args.toward:
        raise UserError("--direction needs --toward (the bug ablation has no direction)")
    started = time.perf_counter()
    if not args.toward:
        from .tune.experiment import ablate

        path = ablate(args.backbone, args.version, _experiment_options(args))
        return _finish_experiment(path, started, "ablate", args.mlflow)
    from .tune.ablation import DEFAULT_DIRECTION, ablate_toward, ablation_summary

    path = ablate_toward(args.backbone, args.version, args.toward, _experiment_options(args),
                         args.direction or DEFAULT_DIRECTION)
    code = _finish_experiment(path, started, "ablate", args.mlflow)
    if code == 0:
        print(ablation_summary(path))
    return code


def cmd_search(args: argparse.Namespace) -> int:
    from .tune.search import search

    started = time.perf_counter()
    path = search(args.space, args.num_samples, args.objective, args.backbone,
                  args.from_experiment, _experiment_options(args),
                  asha_grace=args.asha_grace, asha_reduction=args.asha_reduction,
                  asha=args.asha, sampler=args.sampler,
                  sampler_startup=args.sampler_startup,
                  budget_trial_seconds=args.budget_trial_seconds,
                  budget_share=args.budget_share, race_top=args.race_top,
                  race_runs=args.race_runs, race_over=args.race_over)
    code = _finish_experiment(path, started, "search", args.mlflow)
    if code == 0:
        print(f"the search's choice: `tune-clipfh best {path}`")
    return code


def cmd_best(args: argparse.Namespace) -> int:
    from .tune.best import describe_choice, write_choice

    lines, config = describe_choice(args.experiment, args.metric)
    print("\n".join(lines))
    out = write_choice(config, args.out or Path(args.experiment) / "best_config.yaml")
    print(f"configuration written to {out} (train it: tune-clipfh train --config {out})")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Serve optuna-dashboard on the experiment's study until Ctrl-C (exit 130, as every verb)."""
    from .tune.dashboard import dashboard_server

    server, url = dashboard_server(args.experiment, args.port)
    print(f"optuna-dashboard of {args.experiment} at {url} (Ctrl-C to stop)", flush=True)
    with server:
        server.serve_forever()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    out = args.out or Path("runs") / f"report-{time.strftime('%Y%m%d-%H%M%S')}"
    path = build_report(args.experiments, out, reference_csv=args.reference,
                        log=lambda line: print(line, file=sys.stderr),
                        zero_shot_dirs=args.zero_shot)
    print(f"report: {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, identities=args.identities, num_samples=args.num_samples,
             max_concurrent=args.max_concurrent, gpus_per_trial=args.gpus_per_trial)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .model.pretrain import pretrain

    for backbone in THESIS_BACKBONES if args.backbone == "all" else (args.backbone,):
        started = time.perf_counter()
        path = pretrain(backbone, args.cache_dir, seed=args.seed, progress=not args.no_progress,
                        force=args.force)
        print(f"{backbone}: synthetic pretrained tiny weights at {path} "
              f"({time.perf_counter() - started:.1f}s)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import parse_lines, run_bench, settings_for

    run_bench(parse_lines(args.only), settings_for(args.quick), json_path=args.json,
              cache_dir=args.cache_dir)
    return 0


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]
