"""Line 1, evaluator: ``rank_metrics`` against a per-query NumPy loop of the standard definition
on random problems (same results checked), and the extra memory of a 20,000 x 20,000 evaluation
through the batched features path."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from .harness import Context, PeakRss, Row, make_row, timed


def reference_rank_metrics(distance: np.ndarray, query_ids: np.ndarray,
                           gallery_ids: np.ndarray) -> dict[str, Any]:
    """The standard CMC/AP/INP definition as a straightforward per-query NumPy loop: the one
    reference that line 1 and ``tests/test_evaluation.py`` check ``rank_metrics`` against.

    Ranking uses ``np.argsort(kind="stable")``: ties go to the lower gallery index, the rule
    ``rank_metrics`` documents (an unstable sort could order tied items differently).
    """
    first_hits = np.zeros(distance.shape[1], dtype=np.int64)
    average_precisions, inverse_penalties = [], []
    for row, query_id in enumerate(query_ids):
        order = np.argsort(distance[row], kind="stable")
        hits = np.flatnonzero(gallery_ids[order] == query_id)
        if hits.size == 0:
            continue
        first_hits[hits[0]] += 1
        average_precisions.append(np.mean(np.arange(1, hits.size + 1) / (hits + 1)))
        inverse_penalties.append(hits.size / (hits[-1] + 1))
    cmc = np.cumsum(first_hits) / len(average_precisions)
    return {"cmc": cmc, "rank1": cmc[0], "mAP": float(np.mean(average_precisions)),
            "mINP": float(np.mean(inverse_penalties)), "num_valid_queries": len(average_precisions)}


def random_problem(size: int, positives: str, seed: int = 0):
    """A float32 ``size x size`` distance matrix with query and gallery identities.

    ``single``: the hand protocol (one gallery image per identity, queries of those
    identities); ``multi``: size/4 identities drawn at random for both sides (about four
    positives per query, some queries with none).
    """
    rng = np.random.default_rng(seed)
    distance = rng.random((size, size), dtype=np.float32)
    if positives == "single":
        gallery_ids = rng.permutation(size)
        query_ids = rng.integers(0, size, size)
    else:
        identities = max(1, size // 4)
        gallery_ids = rng.integers(0, identities, size)
        query_ids = rng.integers(0, identities, size)
    return distance, query_ids, gallery_ids


def _agreement(expected: dict, got: dict) -> float:
    """Largest absolute difference over CMC, mAP and mINP."""
    return float(max(np.abs(np.asarray(expected["cmc"]) - np.asarray(got["cmc"])).max(),
                     abs(expected["mAP"] - got["mAP"]), abs(expected["mINP"] - got["mINP"])))


def evaluator_speed(ctx: Context, size: int, positives: str = "single") -> Row:
    """``rank_metrics`` vs the per-query loop on one random problem (results must agree)."""
    from ..evaluation import rank_metrics

    s = ctx.settings
    distance, query_ids, gallery_ids = random_problem(size, positives)
    loop_queries = min(size, s.eval_loop_queries or size)
    loop_s, expected = timed(lambda: reference_rank_metrics(
        distance[:loop_queries], query_ids[:loop_queries], gallery_ids))
    loop_total_s = loop_s * size / loop_queries
    check = rank_metrics(distance[:loop_queries], query_ids[:loop_queries], gallery_ids)
    difference = _agreement(expected, check)
    runs = [timed(lambda: rank_metrics(distance, query_ids, gallery_ids))[0]
            for _ in range(s.eval_repeats)]
    fast_s = statistics.median(runs)
    ratio = loop_total_s / fast_s
    same = difference <= 1e-12
    note = (f"{'one positive per query (hand protocol)' if positives == 'single' else '~4 positives per query'}; "
            f"results {'identical' if same else 'DIFFER'} (max |diff| {difference:.1e}); "
            f"rank_metrics median of {s.eval_repeats}")
    if loop_queries < size:
        note += f"; loop timed on {loop_queries} of {size} queries and scaled x{size / loop_queries:g}"
    key = f"speedup_{size}" + ("" if positives == "single" else "_multi")
    target = (">=", 20.0) if positives == "single" else None
    row = make_row(1, key, f"evaluator speed-up {size}x{size}"
                   + ("" if positives == "single" else " (multi-positive)"), ratio, "x",
                   target, note, {"loop_s": loop_total_s, "loop_measured_s": loop_s,
                                  "rank_metrics_s": fast_s, "max_abs_diff": difference})
    if not same:
        row.passed, row.status = False, "fail"
    return row


def evaluator_memory(ctx: Context) -> Row:
    """Extra RSS of a Q x G evaluation through ``rank_metrics_from_features`` (chunked)."""
    import torch

    from ..evaluation import rank_metrics_from_features

    size, dim = ctx.settings.eval_memory_size, ctx.settings.eval_feature_dim
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(size, dim, generator=generator)
    gallery = torch.randn(size, dim, generator=generator)
    gallery_ids = np.random.default_rng(0).permutation(size)
    query_ids = np.random.default_rng(1).integers(0, size, size)
    with PeakRss() as peak:
        seconds, _ = timed(lambda: rank_metrics_from_features(query, gallery, query_ids,
                                                                gallery_ids))
    extra_gb = peak.extra / 2**30
    inputs_mb = (query.numel() + gallery.numel()) * 4 / 2**20
    full_matrix_gb = size * size * 4 / 2**30
    return make_row(
        1, "memory", f"evaluator extra RSS {size}x{size} (features path)", extra_gb, "GB",
        ("<", 2.0),
        f"{dim}-d float32 features ({inputs_mb:.0f} MB of inputs, not counted); the full "
        f"distance matrix alone would be {full_matrix_gb:.1f} GB; RSS sampled every 1 ms",
        {"seconds": seconds, "baseline_rss_bytes": peak.baseline, "peak_rss_bytes": peak.peak})


def line_evaluator(ctx: Context) -> list[Row]:
    rows = [evaluator_memory(ctx)]  # first: no freed memory of the other problems to reuse
    rows += [evaluator_speed(ctx, size) for size in ctx.settings.eval_sizes]
    rows += [evaluator_speed(ctx, size, "multi") for size in ctx.settings.eval_sizes]
    return rows
