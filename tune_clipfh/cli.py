"""Command line: argument parsing only; each verb calls one function of :mod:`.commands`,
which calls one function of a layer.

User errors (bad config, bad data, unloadable weights) print one ``error:`` line and exit 2,
without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from .commands import (
    cmd_ablate,
    cmd_bench,
    cmd_best,
    cmd_config_check,
    cmd_config_keys,
    cmd_dashboard,
    cmd_data_prepare,
    cmd_data_synth,
    cmd_demo,
    cmd_eval,
    cmd_pretrain,
    cmd_report,
    cmd_reproduce,
    cmd_search,
    cmd_train,
    cmd_versions,
)
from .data.manifest import IDENTITY_SETS
from .errors import UserError
from .extras import MLFLOW_ENV
from .model.registry import BACKBONES, THESIS_BACKBONES
from .names import ASPECTS, DATASETS
from .tune.defaults import (
    ASHA,
    ASHA_GRACE,
    ASHA_REDUCTION,
    OBJECTIVE,
    OBJECTIVES,
    RACE_OVER,
    RACE_RUNS,
    RACE_TOP,
    SAMPLER,
    SAMPLER_STARTUP,
    SAMPLERS,
)


def _gpus_per_trial(text: str) -> float | str:
    from .tune.gpus import parse_gpus_per_trial

    try:
        return parse_gpus_per_trial(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_gpus_per_trial(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus-per-trial", type=_gpus_per_trial, default="auto",
                        help="GPUs each trial gets from Ray (default: auto: none without GPUs; "
                        "with GPUs, 1 or the share of a card a short memory probe measures). "
                        "Fractions share a card without memory isolation; 0 on a cluster with "
                        "GPUs runs device: auto trials on the CPU")


def _add_experiment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per configuration")
    parser.add_argument("--data", help="prepared dataset folder (default: synthetic, tiny)")
    parser.add_argument("--cache-dir", help="decoded-image cache folder")
    parser.add_argument("--name", help="experiment name (default: kind-time)")
    parser.add_argument("--storage", help="results folder or URI (default: ./runs/ray); "
                        "multi-node runs need a shared path")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    _add_gpus_per_trial(parser)
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: as "
                        "resources allow)")
    parser.add_argument("--address", help="connect to an existing Ray cluster")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted experiment --name")
    parser.add_argument("--max-failures", type=int, default=2,
                        help="retries of a crashed trial from its last checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a knob in every trial")
    _add_mlflow(parser)


def _add_mlflow(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mlflow", metavar="URI", default=os.environ.get(MLFLOW_ENV) or None,
                        help="track the runs in MLflow at this tracking URI (sqlite:///FILE or "
                        f"a server's http(s) address; default: ${MLFLOW_ENV}, else none); "
                        "needs pip install 'tune-clipfh[mlflow]'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune-clipfh",
        description="Hyperparameter search for CLIP-ReID-style hand identification")
    verbs = parser.add_subparsers(dest="verb", required=True)

    data = verbs.add_parser("data", help="synthesise or prepare datasets").add_subparsers(
        dest="data_verb", required=True)
    synth = data.add_parser("synth", help="write a synthetic 11k-like dataset")
    synth.add_argument("out")
    synth.add_argument("--identities", type=int, default=60)
    synth.add_argument("--images-per-identity", type=int, default=10)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_data_synth)

    prepare = data.add_parser("prepare", help="build a manifest (train, val, 10 splits)")
    prepare.add_argument("--dataset", choices=DATASETS, default="11k")
    prepare.add_argument("--src", required=True, help="dataset folder (11k: HandInfo.csv, Hands/)")
    prepare.add_argument("--aspect", choices=ASPECTS, default="dorsal_r")
    prepare.add_argument("--out", required=True)
    prepare.add_argument("--seed", type=int, default=0)
    prepare.add_argument("--identity-split", choices=("half", "upstream"), default="half",
                         help="half: first half of sorted identities; upstream: thesis thresholds")
    prepare.add_argument("--val-fraction", type=float, default=None,
                         help="share of training identities held out for validation, in (0, 1) "
                         "(default 0.2)")
    prepare.add_argument("--identity-set", choices=IDENTITY_SETS, default=IDENTITY_SETS[0],
                         help="val_held_out: validation carved from the training identities; "
                         "upstream_all_train: train on all of them, as upstream did (B11)")
    prepare.add_argument("--num-splits", type=int, default=10)
    prepare.add_argument("--cross-aspect-gallery", action="store_true",
                         help="also build pooled galleries of all four aspects (MBA-Net)")
    prepare.set_defaults(func=cmd_data_prepare)

    config = verbs.add_parser("config", help="validate configurations").add_subparsers(
        dest="config_verb", required=True)
    check = config.add_parser("check", help="validate a YAML file and print it resolved")
    check.add_argument("file", help="a YAML path, or a shipped config by name "
                       "(tiny_synthetic, vitb16_11k_dorsal_r, rn50_11k_dorsal_r)")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    check.set_defaults(func=cmd_config_check)
    keys = config.add_parser("keys", help="list every configuration key")
    keys.set_defaults(func=cmd_config_keys)

    train = verbs.add_parser("train", help="train one configuration (both stages + test)")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML configuration")
    source.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--out", help="run folder (default: output_dir/experiment-time)")
    train.add_argument("--no-progress", action="store_true")
    _add_mlflow(train)
    train.set_defaults(func=cmd_train)

    evaluate = verbs.add_parser(
        "eval", help="re-evaluate a saved run on its 10 splits, a pretrained model zero-shot, "
        "or a checkpoint of the thesis under the correct and the as-run protocol")
    evaluate.add_argument("--run", help="a run folder (its best checkpoint)")
    evaluate.add_argument("--config", help="with --zero-shot: the configuration to evaluate")
    evaluate.add_argument("--zero-shot", action="store_true",
                          help="evaluate the pretrained weights without any training")
    evaluate.add_argument("--upstream-config", metavar="FILE",
                          help="an upstream eval YAML (configs/eval_stage2_clip_reid/...): "
                          "evaluate its model_path, a checkpoint of the thesis")
    evaluate.add_argument("--checkpoint", metavar="FILE",
                          help="with --upstream-config: this checkpoint instead of model_path")
    evaluate.add_argument("--data", metavar="DIR",
                          help="with --upstream-config: the prepared dataset (data_dir)")
    evaluate.add_argument("--out", help="with --zero-shot: write test_results.json here; with "
                          "--upstream-config: the results folder (default: "
                          "output_dir/experiment-time)")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(func=cmd_eval)

    versions = verbs.add_parser("versions", help="print the resolved knobs of v1-v10")
    versions.add_argument("--backbone", choices=tuple(BACKBONES))
    versions.add_argument("--version", help="one version, e.g. v5")
    versions.add_argument("--profile", choices=("full", "tiny"), default="full")
    versions.add_argument("--format", choices=("table", "yaml", "json"), default="table")
    versions.add_argument("--as-run", action="store_true",
                          help="the versions as upstream's code ran them (bugs switched on)")
    versions.set_defaults(func=cmd_versions)

    repro = verbs.add_parser("reproduce", help="run v1-v10 as fixed trials of a Tune experiment")
    repro.add_argument("--backbones", default="vitb16,rn50")
    repro.add_argument("--versions", help="comma-separated, e.g. v1,v5 (default: all)")
    repro.add_argument("--as-run", action="store_true",
                       help="run the versions as upstream's code ran them (versions_as_run.yaml)")
    _add_experiment_options(repro)
    repro.set_defaults(func=cmd_reproduce)

    ablation = verbs.add_parser(
        "ablate", help="one version: correct, as-run, and as-run with each upstream bug fixed; "
        "with --toward, the path from the version to a config, one knob group at a time")
    ablation.add_argument("--backbone", choices=tuple(BACKBONES), default="vitb16")
    ablation.add_argument("--version", default="v5")
    ablation.add_argument("--toward", metavar="FILE",
                          help="a config file (or a shipped config by name): run the version, "
                          "FILE, and the steps between them, one knob group "
                          "(search_spaces/knob_groups.yaml) at a time")
    ablation.add_argument("--direction",
                          help="with --toward: forward steps (the version with one group of "
                          "FILE), backward steps (FILE with one group of the version) or both "
                          "(default)")
    ablation.add_argument("--summary", metavar="EXPERIMENT_DIR",
                          help="print the table of a path ablation already run, and exit")
    _add_experiment_options(ablation)
    ablation.set_defaults(func=cmd_ablate)

    search = verbs.add_parser("search", help="Optuna search beyond v10 with ASHA early stopping")
    search.add_argument("--space",
                        help="search-space YAML (default: search_spaces/beyond_v10.yaml)")
    search.add_argument("--num-samples", type=int, default=16)
    search.add_argument("--objective", choices=tuple(OBJECTIVES), default=OBJECTIVE,
                        help="validation metric(s) to maximise")
    search.add_argument("--backbone", choices=tuple(BACKBONES), default="vitb16")
    search.add_argument("--from-experiment", help="a reproduce experiment whose measured "
                        "versions warm-start the study")
    search.add_argument("--sampler", choices=SAMPLERS, default=SAMPLER,
                        help="tpe: multivariate TPE; tpe-univariate; gp: Gaussian process; "
                        "random (default: %(default)s)")
    search.add_argument("--sampler-startup", type=int, default=SAMPLER_STARTUP, metavar="N",
                        help="random trials of the search's own before the sampler models "
                        "(the warm start's measured versions count as start-up too; default: "
                        "%(default)s)")
    search.add_argument("--budget-trial-seconds", type=float, metavar="SECONDS",
                        help="compute budget, in trial-seconds: no trial starts that would not "
                        "fit in it (the search ends at this or --num-samples, whichever first)")
    search.add_argument("--budget-share", type=float, metavar="FRACTION",
                        help="the budget as a share of --from-experiment's trial-seconds per "
                        "seed of this backbone (0.5: half the versions' compute)")
    search.add_argument("--asha-grace", type=int, default=ASHA_GRACE,
                        help="ASHA grace period in image-stage epochs (default: %(default)s)")
    search.add_argument("--asha-reduction", type=int, default=ASHA_REDUCTION,
                        help="ASHA reduction factor (default: %(default)s)")
    search.add_argument("--asha", action=argparse.BooleanOptionalAction, default=ASHA,
                        help="stop trials early with ASHA, comparing them at equal image-stage "
                        "epochs (default: off; see docs/performance.md)")
    search.add_argument("--race-top", type=int, default=RACE_TOP, metavar="K",
                        help="race the K best configurations (by one run's validation) over "
                        "more runs before choosing; 0: no race (default: %(default)s)")
    search.add_argument("--race-runs", type=int, default=RACE_RUNS, metavar="R",
                        help="runs of each raced configuration, its first included "
                        "(default: %(default)s)")
    search.add_argument("--race-over", choices=("seed", "val_fold"), default=RACE_OVER,
                        help="what the race's runs vary: the seed, or the validation "
                        "identities (val_fold) (default: %(default)s)")
    _add_experiment_options(search)
    search.set_defaults(func=cmd_search)

    best = verbs.add_parser("best", help="the configuration a search chose, with its "
                            "provenance, written as a config YAML for train --config")
    best.add_argument("experiment", metavar="SEARCH_DIR", help="a search experiment folder")
    best.add_argument("--out", help="the YAML to write (default: SEARCH_DIR/best_config.yaml)")
    best.add_argument("--metric", help="the validation metric to choose by (default: the "
                      "search's objective, e.g. best_val_rank1)")
    best.set_defaults(func=cmd_best)

    dashboard = verbs.add_parser("dashboard", help="open optuna-dashboard on a search's study "
                                 "(on 127.0.0.1 only), until Ctrl-C")
    dashboard.add_argument("experiment", metavar="SEARCH_DIR",
                           help="a search experiment folder (its optuna.db)")
    dashboard.add_argument("--port", type=int, default=8080,
                           help="port on 127.0.0.1 (default: %(default)s; 0: a free one)")
    dashboard.set_defaults(func=cmd_dashboard)

    report = verbs.add_parser("report", help="write report.html (plotly, offline) and CSV "
                              "tables from reproduce/search experiments")
    report.add_argument("experiments", nargs="+", metavar="EXPERIMENT_DIR",
                        help="Tune experiment folders (reproduce and/or search)")
    report.add_argument("--out", help="report folder (default: runs/report-time)")
    report.add_argument("--reference", metavar="CSV", help="the thesis's per-version table "
                        "(default: analysis/thesis_clipfh_11k_dorsal_r_eval.csv)")
    report.add_argument("--zero-shot", action="append", default=[], metavar="DIR",
                        help="a zero-shot evaluation (eval --zero-shot --out DIR), drawn as a "
                        "reference in figures 1 and 2; repeatable")
    report.set_defaults(func=cmd_report)

    demo = verbs.add_parser("demo", help="zero-shot, reproduce and search on the embedded "
                            "synthetic dataset with tiny models, then the report")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--num-samples", type=int, default=4,
                      help="search trials, its race run included (default: %(default)s)")
    demo.add_argument("--max-concurrent", type=int, default=2)
    demo.add_argument("--identities", type=int, default=160,
                      help="synthetic identities of the demo's dataset (default 160, the "
                           "embedded default)")
    _add_gpus_per_trial(demo)
    demo.set_defaults(func=cmd_demo)

    pretrain = verbs.add_parser("pretrain", help="contrastive image-text pretraining of the tiny "
                                "backbones on synthetic captioned hands (pretrained: synthetic)")
    pretrain.add_argument("--backbone", choices=(*BACKBONES, "all"), default="all",
                          help=f"all: {', '.join(THESIS_BACKBONES)} (default: %(default)s)")
    pretrain.add_argument("--seed", type=int, default=0,
                          help="seed of the corpus, the initialisation and the batch order "
                          "(pretrained: synthetic uses 0)")
    pretrain.add_argument("--force", action="store_true",
                          help="pretrain again even when the weights are cached")
    pretrain.add_argument("--cache-dir", help="cache folder (default: TUNE_CLIPFH_CACHE or "
                          "~/.cache/tune-clipfh)")
    pretrain.add_argument("--no-progress", action="store_true")
    pretrain.set_defaults(func=cmd_pretrain)

    bench = verbs.add_parser("bench", help="performance benchmark: ratios measured side by side "
                             "(evaluator, Tune overhead, input pipeline, prompt cache, "
                             "concurrency, memory, search efficiency, CUDA)")
    bench.add_argument("--quick", action="store_true",
                       help="smaller sizes and budgets (under 5 minutes on 2 cores)")
    bench.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    bench.add_argument("--only", metavar="LINES", help="comma-separated line numbers, e.g. 1,3")
    bench.add_argument("--cache-dir", help="decoded-image cache folder")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
