"""``tune-clipfh demo`` (``make demo``): the main job on the embedded default, in minutes.

On the synthetic 11k-like dataset with the tiny CLIPs pretrained on synthetic captioned hands:

1. the tiny RN50's zero-shot evaluation: what fine-tuning has to beat;
2. ``reproduce``: the best thesis version of RN50 in the miniature (v5) with two seeds, so the
   report knows its seed noise (ViT-B/16, whose fine-tuning in the miniature stays at its
   zero-shot level, is left out: README);
3. ``search`` on RN50, the backbone whose fine-tuning in the miniature learns, warm-started with the measured
   version and ending with a race of its best configuration;
4. the report, whose claims compare the search's choice and the version with RN50's zero-shot
   and with each other, each against its seed noise, and ``best``'s configuration file.

The schedules are shortened (``DEMO_SCHEDULES``: RN50 needs about 30 image epochs to gain over
its zero-shot start) so that it all fits in about five minutes on 2 CPU cores; what they give
is in docs/usage.md, "The demo". ``tune-clipfh train --config configs/tiny_synthetic.yaml``
is the single run (README, "A five-minute tour").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import load_config
from .resources import resource_path

DEMO_CONFIG = resource_path("configs", "tiny_synthetic.yaml")
SEARCHED = "rn50"
"""The backbone the demo searches: the one whose miniature learns (README)."""
DEMO_SCHEDULES = {"rn50": {"epochs_prompt": 3, "epochs_image": 30}}
"""The demo's stage lengths per backbone (warm-ups shorten with them; the search keeps them
fixed). Early stopping is the tiny profile's (off)."""
DEMO_VERSIONS = {"rn50": ["v5"]}
DEMO_SEEDS = {"rn50": 2}


def run_demo(out: str | Path, identities: int, num_samples: int, max_concurrent: int,
             gpus_per_trial: float | str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the four steps under ``out``; returns the folders written."""
    from .data.prepared import default_cache_dir, synthetic_dataset, synthetic_default
    from .tune.experiment import ExperimentOptions

    started = time.perf_counter()
    out = Path(out).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data_dir = synthetic_dataset(default_cache_dir(),
                                 **{**synthetic_default(), "identities": identities}).resolve()

    def options(name: str, backbone: str, **kwargs: Any) -> ExperimentOptions:
        return ExperimentOptions(storage=str(out / "ray"), profile="tiny", data=str(data_dir),
                                 name=f"{name}-{stamp}", overrides=dict(DEMO_SCHEDULES[backbone]),
                                 max_concurrent=max_concurrent, gpus_per_trial=gpus_per_trial,
                                 **kwargs)

    folders: dict[str, Any] = {}
    log(f"== 1/4 zero-shot: the pretrained tiny {SEARCHED} on {identities} synthetic "
        f"identities, no training")
    folders["zero_shot"] = _zero_shot(data_dir, out / f"zero-shot-{SEARCHED}-{stamp}", log)
    folders["reproduce"] = [_reproduce(backbone, options, log) for backbone in DEMO_VERSIONS]
    log(f"== 3/4 search {SEARCHED} beyond v10 ({num_samples} trials, its race run included, "
        f"warm-started with the measured version)")
    folders["search"], folders["best"] = _search(num_samples, folders["reproduce"][0],
                                                 options("search", SEARCHED), log)
    log("== 4/4 report")
    folders["report"] = _report(folders, out / f"report-{stamp}", log)
    log(f"\ndemo finished in {time.perf_counter() - started:.0f}s; results:\n"
        f"  zero-shot:     {folders['zero_shot']}\n"
        + "".join(f"  reproduce:     {p}\n" for p in folders["reproduce"])
        + f"  search:        {folders['search']}\n"
        f"  its choice:    {folders['best']} (tune-clipfh train --config ...)\n"
        f"  report:        {folders['report']}")
    return folders


def _zero_shot(data_dir: Path, folder: Path, log: Callable[[str], None]) -> Path:
    """Step 1: the searched backbone's zero-shot test, the floor fine-tuning has to beat."""
    from .train.run import result_lines, zero_shot_run

    config = load_config(DEMO_CONFIG, [f"data_dir={data_dir}"]).config
    log(f"  test {result_lines(zero_shot_run(config, folder, progress=False)['test'])[0]}")
    return folder


def _reproduce(backbone: str, options: Callable[..., Any], log: Callable[[str], None]) -> Path:
    """Step 2: the backbone's demo versions at the demo's schedule."""
    from .tune.experiment import reproduce
    from .tune.results import summarize_experiment

    schedule = DEMO_SCHEDULES[backbone]
    log(f"== 2/4 reproduce {', '.join(DEMO_VERSIONS[backbone])} of {backbone} "
        f"({DEMO_SEEDS[backbone]} seed(s), {schedule['epochs_prompt']} + "
        f"{schedule['epochs_image']} epochs)")
    path = reproduce([backbone], DEMO_VERSIONS[backbone],
                     options(f"reproduce-{backbone}", backbone, seeds=DEMO_SEEDS[backbone]))
    log(summarize_experiment(path))
    return path


def _search(num_samples: int, versions: Path, options: Any,
            log: Callable[[str], None]) -> tuple[Path, Path]:
    """Step 3: the search warm-started with the measured version (no other version runs
    first), its race of one, and ``best``'s configuration file."""
    from .tune.best import describe_choice, write_choice
    from .tune.defaults import OBJECTIVE
    from .tune.results import summarize_experiment
    from .tune.search import search

    path = search(None, num_samples, OBJECTIVE, SEARCHED, str(versions), options,
                  warm_start=False, race_top=1)
    log(summarize_experiment(path))
    lines, knobs = describe_choice(path)
    log("\n".join(lines))
    return path, write_choice(knobs, path / "best_config.yaml")


def _report(folders: dict[str, Any], out: Path, log: Callable[[str], None]) -> Path:
    """Step 4: the report over every experiment, with the zero-shot; its claims printed."""
    import pandas as pd

    from .report import build_report

    report = build_report([*folders["reproduce"], folders["search"]], out,
                          zero_shot_dirs=[folders["zero_shot"]])
    claims_csv = report.parent / "claims.csv"
    claims = [str(c) for c in pd.read_csv(claims_csv)["claim"]] if claims_csv.is_file() else []
    log("claims (report, section 8):" if claims else "claims: none could be made")
    for claim in claims:
        log(f"  {claim}")
    return report
