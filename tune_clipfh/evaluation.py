"""The hand-ReID evaluation protocol on top of :mod:`.ranking`'s metrics: 10 query/gallery
splits of the test identities ranked over features extracted once, the upstream table row,
Rank-1 expected at another gallery size, and test-time flip averaging.

The ranking functions are re-exported here, where the trainer, the bench and the tests import
them from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .ranking import (
    DEFAULT_RANKS,
    as_float_matrix,
    check_ranks,
    label_list,
    pairwise_distance,
    rank_metrics,
    rank_metrics_from_features,
)

__all__ = ["UPSTREAM_COLUMNS", "UPSTREAM_NUM_SPLITS", "evaluate_splits", "expected_rank1",
           "flip_average", "pairwise_distance", "rank_metrics", "rank_metrics_from_features",
           "upstream_table_row"]

UPSTREAM_NUM_SPLITS = 10
_UPSTREAM_METRICS = (("R1", "rank1"), ("R5", "rank5"), ("R10", "rank10"), ("mAP", "mAP"))
UPSTREAM_COLUMNS = tuple(
    f"split{split}_{column}"
    for split in range(1, UPSTREAM_NUM_SPLITS + 1)
    for column, _ in _UPSTREAM_METRICS
) + tuple(f"final_{column}" for column, _ in _UPSTREAM_METRICS)


def expected_rank1(features, ids, gallery_identities: int, metric: str = "cosine") -> float:
    """Rank-1 expected against a gallery of ``gallery_identities`` identities, one random image
    each, estimated from every pair of one labelled set (each image a query in turn).

    For a query q, a positive p (another image of q's identity) and an impostor identity j,
    let e(q, p, j) be the share of j's images closer to q than p (ties count half). With p as
    the gallery image of q's identity and one random image per impostor identity, q ranks its
    match first with probability prod_j (1 - e(q, p, j)). Drawing the N - 1 impostors from the
    set's other identities gives

        R1(N) = mean over (q, p) of exp((N - 1) * mean_j log(1 - e(q, p, j))),

    exact for N = the set's own identity count (the Rank-1 averaged over every gallery choice,
    smoother than one split) and an extrapolation for a larger N: a validation set of 16
    identities, where one split's Rank-1 saturates near 90 %, read at the test gallery's size.
    Identities with one image have no positive and are used as impostors only.
    """
    if gallery_identities < 2:
        raise ValueError(f"gallery_identities must be at least 2, got {gallery_identities}")
    matrix = as_float_matrix(features, "features")
    labels = np.asarray(label_list(ids))
    if len(labels) != len(matrix):
        raise ValueError(f"{len(labels)} ids for {len(matrix)} feature rows")
    names, codes = np.unique(labels, return_inverse=True)
    if len(names) < 2:
        raise ValueError("expected_rank1 needs at least two identities")
    codes_t = torch.as_tensor(codes)
    distance = pairwise_distance(matrix, matrix, metric).double()
    members = F.one_hot(codes_t, len(names)).double()  # (n, K)
    per_identity = members.sum(dim=0)
    probabilities = []
    for identity in range(len(names)):
        rows = torch.nonzero(codes_t == identity).flatten()
        if len(rows) < 2:
            continue
        block = distance[rows]  # (m, n): each query of this identity against every image
        positive = block[:, rows]  # (m, m); the diagonal (q against itself) is dropped below
        closer = (block[:, None, :] < positive[:, :, None]).double() \
            + 0.5 * (block[:, None, :] == positive[:, :, None]).double()  # (q, p, image)
        share = closer @ members / per_identity  # (q, p, K): e(q, p, j)
        impostors = torch.ones(len(names), dtype=torch.bool)
        impostors[identity] = False
        log_hit = torch.log1p(-share[:, :, impostors].clamp(max=1.0)).mean(dim=2)
        pairs = ~torch.eye(len(rows), dtype=torch.bool)
        probabilities.append(torch.exp((gallery_identities - 1) * log_hit[pairs]))
    if not probabilities:
        raise ValueError("expected_rank1 needs an identity with two images or more")
    return float(torch.cat(probabilities).mean())


def flip_average(extract: Callable[[torch.Tensor], torch.Tensor],
                 images: torch.Tensor) -> torch.Tensor:
    """Test-time flip augmentation: mean of the features of the images and their mirror images
    (horizontal flip of NCHW batches). Normalise afterwards if the metric needs it."""
    return (extract(images) + extract(images.flip(-1))) / 2


# --------------------------------------------------------------------------------------------
# Multi-split protocol (11k Hands: 10 Monte-Carlo query/gallery splits of the test identities)
# --------------------------------------------------------------------------------------------


def _feature_matrix(features) -> torch.Tensor:
    """Rows of all test samples; a Mapping must be keyed by row index 0..N-1."""
    if isinstance(features, Mapping):
        features = torch.stack([torch.as_tensor(features[row]) for row in range(len(features))])
    return as_float_matrix(features, "features")


def evaluate_splits(features, ids, splits, metric="cosine", ranks=DEFAULT_RANKS,
                    ap="standard") -> dict:
    """Evaluate query/gallery splits that are row selections over features extracted once.

    Args:
        features: (N, D) array/tensor of all test samples, or a Mapping row index -> vector.
        ids: identity of each of the N rows.
        splits: sequence of ``(query_rows, gallery_rows)`` integer index arrays; a row may not
            be in both the query and the gallery of one split (it would match itself).

    Returns:
        ``per_split``: list of ``rank_metrics`` results; ``mean`` and ``std`` over splits of
        each ``rank{k}``, ``mAP`` and ``mINP``; ``cmc_mean``: mean CMC curve (a curve shorter
        than the longest is extended with its last value, which is what CMC does past the end
        of a gallery). ``std`` is the sample standard deviation (ddof=1), 0.0 for one split; it
        matches the thesis's ``std_R1`` (e.g. 6.81 for ViT v1).
    """
    matrix = _feature_matrix(features)
    labels = label_list(ids)
    if len(labels) != len(matrix):
        raise ValueError(f"{len(labels)} ids for {len(matrix)} feature rows")
    if len(splits) == 0:
        raise ValueError("no splits given")

    per_split = []
    for split_index, (query_rows, gallery_rows) in enumerate(splits):
        query_rows = np.asarray(query_rows, dtype=np.int64)
        gallery_rows = np.asarray(gallery_rows, dtype=np.int64)
        if np.intersect1d(query_rows, gallery_rows).size:
            raise ValueError(f"split {split_index}: some rows are both query and gallery")
        per_split.append(rank_metrics_from_features(
            matrix[query_rows], matrix[gallery_rows],
            [labels[row] for row in query_rows], [labels[row] for row in gallery_rows],
            metric=metric, ranks=ranks, ap=ap))

    names = [f"rank{k}" for k in check_ranks(ranks)] + ["mAP", "mINP"]
    values = {name: np.array([result[name] for result in per_split]) for name in names}
    ddof = 1 if len(per_split) > 1 else 0
    longest = max(len(result["cmc"]) for result in per_split)
    curves = [np.pad(result["cmc"], (0, longest - len(result["cmc"])), mode="edge")
              for result in per_split]
    return {
        "per_split": per_split,
        "mean": {name: float(v.mean()) for name, v in values.items()},
        "std": {name: float(v.std(ddof=ddof)) for name, v in values.items()},
        "cmc_mean": np.mean(curves, axis=0),
    }


def upstream_table_row(result: dict) -> dict:
    """One row of the upstream ``stage2_*_eval_table.csv``, keyed by ``UPSTREAM_COLUMNS``.

    Values are percentages rounded to 2 decimals; ``final_*`` is the mean over splits. Columns
    of splits that were not evaluated (fewer than 10) are None.
    """
    per_split = result["per_split"]
    if len(per_split) > UPSTREAM_NUM_SPLITS:
        raise ValueError(f"the upstream table has {UPSTREAM_NUM_SPLITS} split columns, "
                         f"got {len(per_split)} splits")

    def percent(value: float) -> float:
        return round(100 * value, 2)

    row = dict.fromkeys(UPSTREAM_COLUMNS)
    for split, metrics in enumerate(per_split, start=1):
        for column, name in _UPSTREAM_METRICS:
            row[f"split{split}_{column}"] = percent(metrics[name])
    for column, name in _UPSTREAM_METRICS:
        row[f"final_{column}"] = percent(result["mean"][name])
    return row
