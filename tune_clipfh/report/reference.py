"""The thesis's published per-version numbers (``analysis/``), and ours beside them."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

THESIS_LABEL = "thesis, upstream implementation, 11k dorsal-right"


def load_reference(path: str | Path, stage: str = "stage2") -> pd.DataFrame:
    """The thesis's per-version test numbers (percent) for one stage, one row per version.

    ``rank1``/``mAP`` are the means over the 10 splits (``mean_*``, consistent with the
    per-split columns); ``table_final_*`` is what the thesis table printed (they differ for
    RN50 v9, whose CSV row mixes two runs).
    """
    raw = pd.read_csv(path)
    raw = raw[raw["stage"] == stage] if "stage" in raw else raw
    return pd.DataFrame({
        "backbone": raw["backbone"], "version": raw["version"],
        "rank1": raw["mean_R1"], "rank1_std": raw["std_R1"],
        "mAP": raw["mean_mAP"], "mAP_std": raw["std_mAP"],
        "rank5": raw["mean_R5"], "rank10": raw["mean_R10"],
        "table_final_rank1": raw.get("thesis_table_final_R1"),
        "table_final_mAP": raw.get("thesis_table_final_mAP"),
        "n_splits": raw.get("n_splits"),
    }).reset_index(drop=True)


def version_number(version: Any) -> int:
    match = re.fullmatch(r"v(\d+)", str(version))
    return int(match.group(1)) if match else 10_000


def versus_reference(configs: pd.DataFrame, reference: pd.DataFrame | None) -> pd.DataFrame:
    """Per fixed version and backbone: ours (mean, std over splits and seeds) and the thesis's."""
    columns = ["label", "backbone", "version", "experiment", "ours_rank1", "ours_rank1_std",
               "ours_mAP", "ours_mAP_std", "thesis_rank1", "thesis_rank1_std", "thesis_mAP",
               "thesis_mAP_std", "thesis_table_final_rank1"]
    fixed = configs[configs["kind"] == "fixed"] if "kind" in configs else configs.iloc[:0]
    if fixed.empty:
        return pd.DataFrame(columns=columns)
    several = fixed["experiment"].nunique() > 1
    rows = []
    for _, row in fixed.iterrows():
        ref = _reference_row(reference, row["backbone"], row["version"])
        label = f"{row['backbone']} {row['version']}"
        rows.append({
            "label": f"{label} ({row['experiment']})" if several else label,
            "backbone": row["backbone"], "version": row["version"],
            "experiment": row["experiment"],
            "ours_rank1": row["rank1"], "ours_rank1_std": row["rank1_std"],
            "ours_mAP": row["mAP"], "ours_mAP_std": row["mAP_std"],
            "thesis_rank1": ref.get("rank1", math.nan),
            "thesis_rank1_std": ref.get("rank1_std", math.nan),
            "thesis_mAP": ref.get("mAP", math.nan), "thesis_mAP_std": ref.get("mAP_std", math.nan),
            "thesis_table_final_rank1": ref.get("table_final_rank1", math.nan),
        })
    out = pd.DataFrame(rows, columns=columns)
    out["_v"] = out["version"].map(version_number)
    return out.sort_values(["backbone", "_v", "experiment"], kind="stable").drop(
        columns="_v").reset_index(drop=True)


def _reference_row(reference: pd.DataFrame | None, backbone: Any, version: Any) -> dict:
    if reference is None or reference.empty:
        return {}
    match = reference[(reference["backbone"] == backbone) & (reference["version"] == version)]
    return match.iloc[0].to_dict() if len(match) else {}
