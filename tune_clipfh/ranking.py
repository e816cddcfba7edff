"""Re-ID retrieval metrics: CMC, mAP and mINP from distances or features, and the distances.

Small pure functions in the style of torchreid's ``metrics/rank.py``, but vectorised on torch
and processed in query chunks so memory stays bounded for large query x gallery problems.

Definitions (hand datasets have no camera ids, so there is no same-camera junk filtering):

* A query is *valid* when its identity occurs in the gallery; invalid queries are excluded from
  every average and counted in ``num_excluded_queries``.
* CMC@k: fraction of valid queries with at least one correct match in the top k.
* ``ap="standard"`` (torchreid ``eval_market1501``, CLIP-ReID ``eval_func``, the thesis's
  ``engine/evaluator.py``): AP = mean over positives of precision at that positive's rank.
  With one positive, AP = 1/rank.
* ``ap="trapezoid"`` (MBA-Net / CLIP-HandID ``compute_mAP``, the Market-1501 devkit lineage):
  hit i (1-based) at rank r_i contributes ``(precision_i + old_precision_i) / 2 / n_pos`` with
  ``precision_i = i / r_i`` and ``old_precision_i = (i - 1) / (r_i - 1)``, or 1 when r_i = 1.
  With one positive, AP = 1 at rank 1 and 1/(2 * rank) otherwise.
* mINP (fast-reid): ``n_pos / rank of the hardest (last-ranked) positive``, averaged.

Ties: each distance row is sorted with a *stable* ascending sort, so gallery items at equal
distance are ranked by gallery index, lower index first. (The thesis ranked with
``argsort(score)[::-1]``, which breaks ties toward the higher index; with continuous features
ties are essentially absent, so this only matters for degenerate inputs.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .names import AP_MODES, EVAL_METRICS

METRICS = (*EVAL_METRICS, "dot")
"""The configuration's distances, and ``dot``: ranking by negative dot product of the features
as given (upstream test scoring, B12)."""
# Reported in every result, whatever extra ranks are requested: the upstream tables need them.
DEFAULT_RANKS = (1, 5, 10)

# Budget for the per-chunk intermediates of the ranking code. Per distance-matrix element a
# chunk holds at most: the distance block (8 B), sorted values (8 B), sort indices (8 B),
# gathered gallery codes (8 B), the match mask (1 B) and, in the worst case of an all-positive
# gallery, two int64 hit coordinates (16 B); 64 B is a round upper bound.
CHUNK_MEMORY_BYTES = 64 * 2**20
BYTES_PER_ELEMENT = 64
# Up to this many positives per query, ranks come from compare-and-count passes (2 per
# positive, ~1 ns per distance each); beyond it from one sort of each row (~4 ns per distance).
_MAX_COUNTING_POSITIVES = 2


# --------------------------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------------------------


def label_list(labels) -> list:
    """Identity labels as a list of plain hashable Python values."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1:
            raise ValueError(f"ids must be one-dimensional, got shape {labels.shape}")
        return labels.tolist()
    return list(labels)


def _label_array(labels) -> np.ndarray | None:
    """A 1-D numpy view of array-like labels (tensor or ndarray), else None."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    if not isinstance(labels, np.ndarray):
        return None
    if labels.ndim != 1:
        raise ValueError(f"ids must be one-dimensional, got shape {labels.shape}")
    return labels


def _encode_ids(query_ids, gallery_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Map query and gallery labels (any hashable values) jointly to int64 codes."""
    query_array, gallery_array = _label_array(query_ids), _label_array(gallery_ids)
    if (query_array is not None and gallery_array is not None
            and query_array.dtype.kind == gallery_array.dtype.kind
            and query_array.dtype.kind in "iuU"):
        # Two integer arrays or two string arrays: np.unique gives the same grouping as the
        # dict below, without a Python loop over every label.
        _, inverse = np.unique(np.concatenate([query_array, gallery_array]),
                               return_inverse=True)
        codes = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
        return codes[:len(query_array)], codes[len(query_array):]
    # A dict rather than np.unique: labels of mixed types (e.g. 1 and "1") must stay distinct.
    codes: dict = {}
    query = [codes.setdefault(label, len(codes)) for label in label_list(query_ids)]
    gallery = [codes.setdefault(label, len(codes)) for label in label_list(gallery_ids)]
    return (
        torch.tensor(query, dtype=torch.int64),
        torch.tensor(gallery, dtype=torch.int64),
    )


def _as_matrix(values, name: str) -> torch.Tensor:
    """A 2-D tensor view of ``values`` (no copy for numpy arrays and tensors)."""
    tensor = torch.as_tensor(values)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be two-dimensional, got shape {tuple(tensor.shape)}")
    return tensor


def _widen(tensor: torch.Tensor) -> torch.Tensor:
    """float32/64 as is; anything else (half precision, integers) as float32, which is exact
    for half precision and so keeps its ties."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def as_float_matrix(values, name: str) -> torch.Tensor:
    return _widen(_as_matrix(values, name))


def _check_choice(value: str, valid: Sequence[str], name: str) -> None:
    if value not in valid:
        raise ValueError(f"invalid {name} {value!r}; valid values are {', '.join(valid)}")


def check_ranks(ranks: Iterable[int]) -> tuple[int, ...]:
    ranks = tuple(ranks)
    if any(int(k) != k or k < 1 for k in ranks):
        raise ValueError(f"ranks must be positive integers, got {ranks}")
    return tuple(sorted(set(DEFAULT_RANKS) | {int(k) for k in ranks}))


def rows_per_chunk(num_gallery: int, memory_bytes: int = CHUNK_MEMORY_BYTES) -> int:
    """Number of query rows whose ranking intermediates fit in ``memory_bytes``."""
    return max(1, memory_bytes // (BYTES_PER_ELEMENT * max(1, num_gallery)))


def _chunk_rows(chunk_size: int | None, num_gallery: int) -> int:
    if chunk_size is None:
        return rows_per_chunk(num_gallery)
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return int(chunk_size)


# --------------------------------------------------------------------------------------------
# Ranking core, shared by the distance-matrix and the feature paths
# --------------------------------------------------------------------------------------------


class _GalleryGroups:
    """Gallery indices grouped by identity code (ascending within a code), built once per call,
    so each query's positives are found without a query x gallery comparison."""

    def __init__(self, gallery_codes: torch.Tensor, num_codes: int):
        self.order = torch.sort(gallery_codes, stable=True).indices
        self.counts = torch.bincount(gallery_codes, minlength=num_codes)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def to(self, device: torch.device) -> _GalleryGroups:
        if self.order.device != device:
            for name in ("order", "counts", "starts"):
                setattr(self, name, getattr(self, name).to(device))
        return self


def _sorted_rows(distance: torch.Tensor) -> torch.Tensor:
    """Each row's values in ascending order (values only, no indices); NaN sorts last. On the
    CPU numpy's vectorised quicksort is several times faster than ``torch.sort``."""
    if distance.device.type != "cpu":
        return torch.sort(distance, dim=1).values
    return torch.from_numpy(np.sort(distance.detach().numpy(), axis=1))


def _has_nan(distance: torch.Tensor) -> bool:
    if distance.device.type != "cpu":
        return bool(torch.isnan(distance).any())
    return bool(np.isnan(distance.detach().numpy().min()))  # numpy's min propagates NaN


def _count_below(distance: torch.Tensor, thresholds: torch.Tensor,
                 inclusive: bool) -> torch.Tensor:
    """Per row, the number of entries ``<`` (or ``<=``) that row's threshold ([C, 1])."""
    if distance.device.type != "cpu":
        return (distance <= thresholds if inclusive else distance < thresholds).sum(1)
    # numpy's compare and int32 sum run several times faster than torch's bool sum on the CPU.
    values, limits = distance.detach().numpy(), thresholds.numpy()
    below = np.less_equal(values, limits) if inclusive else np.less(values, limits)
    return torch.from_numpy(below.sum(1, dtype=np.int32).astype(np.int64))


def _hits_by_counting(distance: torch.Tensor, query_codes: torch.Tensor,
                      groups: _GalleryGroups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank of every positive without sorting indices: rank = 1 + the number of gallery items at
    a strictly smaller distance.

    With at most ``_MAX_COUNTING_POSITIVES`` positives per query (the hand protocols have one
    gallery image per identity) the counts come from compare-and-count passes over each row;
    with more, from binary search in each row's sorted values. Exact when no other item has
    exactly a positive's distance; rows where one does are flagged ``tied`` (the stable tie rule
    needs gallery indices there) and left to :func:`_hits_by_sorting`.
    """
    num_rows, num_gallery = distance.shape
    if num_rows and _has_nan(distance):
        raise ValueError("distance contains NaN; cannot rank (diverged features?)")
    num_pos = groups.counts[query_codes]
    first_hit = torch.cumsum(num_pos, 0) - num_pos
    rows = torch.repeat_interleave(torch.arange(num_rows, device=distance.device), num_pos)
    within = torch.arange(rows.numel(), device=distance.device) - first_hit[rows]
    cols = groups.order[groups.starts[query_codes][rows] + within]
    thresholds = distance[rows, cols]
    width = int(num_pos.max()) if num_rows else 0
    tied = torch.zeros(num_rows, dtype=torch.bool, device=distance.device)
    if width == 0:
        return rows, cols + 1, tied
    padded = torch.zeros((num_rows, width), dtype=distance.dtype, device=distance.device)
    padded[rows, within] = thresholds
    if width <= _MAX_COUNTING_POSITIVES:
        below = torch.stack([_count_below(distance, padded[:, k:k + 1], inclusive=False)
                             for k in range(width)], dim=1)[rows, within]
        at_or_below = torch.stack([_count_below(distance, padded[:, k:k + 1], inclusive=True)
                                   for k in range(width)], dim=1)[rows, within]
        tied_hits = at_or_below - below > 1  # another item at exactly the positive's distance
    else:
        ordered = _sorted_rows(distance)
        below = torch.searchsorted(ordered, padded)[rows, within]
        # ordered[row, below] is the positive's own value; a tied item would sit right after.
        after = ordered[rows, (below + 1).clamp(max=num_gallery - 1)]
        tied_hits = (below + 1 < num_gallery) & (after == thresholds)
    tied[rows[tied_hits]] = True
    return rows, below + 1, tied


def _hits_by_sorting(distance: torch.Tensor, query_codes: torch.Tensor,
                     gallery_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of every positive from a stable argsort of each row (ties: lower gallery index
    first). Hit coordinates come back in row-major order, sorted by rank within a row."""
    order = torch.sort(distance, dim=1, stable=True).indices
    matches = gallery_codes[order] == query_codes[:, None]
    rows, cols = matches.nonzero(as_tuple=True)
    return rows, cols + 1


def _chunk_statistics(distance: torch.Tensor, query_codes: torch.Tensor,
                      gallery_codes: torch.Tensor, groups: _GalleryGroups, ap: str) -> dict:
    """First-hit rank histogram, and AP and INP of each valid query of one chunk."""
    num_rows, num_gallery = distance.shape
    hit_rows, ranks, tied = _hits_by_counting(distance, query_codes, groups)
    if bool(tied.any()):  # exact stable tie rule for the (rare) rows with equal distances
        keep = ~tied[hit_rows]
        tied_rows = tied.nonzero().squeeze(1)
        sub_rows, sub_ranks = _hits_by_sorting(distance[tied_rows], query_codes[tied_rows],
                                               gallery_codes)
        hit_rows = torch.cat([hit_rows[keep], tied_rows[sub_rows]])
        ranks = torch.cat([ranks[keep], sub_ranks])
    # Hits grouped by row, sorted by rank within a row (ranks in a row are distinct).
    order = torch.sort(hit_rows * (num_gallery + 1) + ranks).indices
    hit_rows, ranks = hit_rows[order], ranks[order]

    num_pos = torch.bincount(hit_rows, minlength=num_rows)
    first_hit = torch.cumsum(num_pos, 0) - num_pos
    valid = num_pos > 0

    hit_rank = ranks.to(torch.float64)
    hit_ordinal = (torch.arange(hit_rows.numel(), device=hit_rows.device)
                   - first_hit[hit_rows] + 1).to(torch.float64)
    precision = hit_ordinal / hit_rank
    if ap == "standard":
        hit_terms = precision
    else:
        previous_precision = torch.where(
            hit_rank > 1, (hit_ordinal - 1) / (hit_rank - 1).clamp(min=1), 1.0)
        hit_terms = (precision + previous_precision) / 2
    ap_sums = torch.zeros(num_rows, dtype=torch.float64, device=distance.device)
    ap_sums.index_add_(0, hit_rows, hit_terms)

    num_pos_valid = num_pos[valid].to(torch.float64)
    first_rank = ranks[first_hit[valid]]
    last_rank = ranks[first_hit[valid] + num_pos[valid] - 1]
    return {
        # Counted by 0-based position: index k holds the queries first matched at rank k + 1.
        "first_rank_counts": torch.bincount(first_rank - 1, minlength=num_gallery),
        "ap": (ap_sums[valid] / num_pos_valid).cpu(),
        "inp": (num_pos_valid / last_rank).cpu(),
        "num_excluded": int((~valid).sum()),
    }


def _rank_metrics_from_chunks(distance_chunks: Iterable[torch.Tensor], query_codes: torch.Tensor,
                              gallery_codes: torch.Tensor, num_gallery: int,
                              ranks: Iterable[int], ap: str, max_rank: int | None) -> dict:
    """Accumulate chunk statistics into the final metrics dict.

    ``distance_chunks`` yields consecutive row blocks of the query x gallery distance matrix.
    """
    ranks = check_ranks(ranks)
    _check_choice(ap, AP_MODES, "ap")
    if max_rank is not None and (int(max_rank) != max_rank or max_rank < 1):
        raise ValueError(f"max_rank must be a positive integer or None, got {max_rank!r}")
    first_rank_counts = torch.zeros(num_gallery, dtype=torch.int64)
    # Codes are 0..K-1 over query and gallery labels jointly (_encode_ids); the gallery is
    # never empty (_check_id_lengths).
    num_codes = int(torch.cat([query_codes, gallery_codes]).max()) + 1
    groups = _GalleryGroups(gallery_codes, num_codes)
    # Per-query values are kept (8 B each) and summed once, so results do not depend on chunking.
    average_precisions, inverse_negative_penalties = [], []
    num_excluded = start = 0
    for chunk in distance_chunks:
        stop = start + chunk.shape[0]
        stats = _chunk_statistics(chunk, query_codes[start:stop].to(chunk.device),
                                  gallery_codes.to(chunk.device), groups.to(chunk.device), ap)
        first_rank_counts += stats["first_rank_counts"].cpu()
        average_precisions.append(stats["ap"])
        inverse_negative_penalties.append(stats["inp"])
        num_excluded += stats["num_excluded"]
        start = stop
    num_valid = int(first_rank_counts.sum())
    if num_valid == 0:
        raise ValueError(
            f"no valid queries: none of the {num_excluded} query identities occurs in the gallery")

    full_cmc = torch.cumsum(first_rank_counts, 0).numpy() / num_valid
    result = {"cmc": full_cmc if max_rank is None else full_cmc[:int(max_rank)]}
    # Beyond the gallery size CMC stays at its last value (1.0: every valid query has a hit).
    result.update({f"rank{k}": float(full_cmc[min(k, num_gallery) - 1]) for k in ranks})
    result.update({
        "mAP": float(torch.cat(average_precisions).mean()),
        "mINP": float(torch.cat(inverse_negative_penalties).mean()),
        "num_valid_queries": num_valid,
        "num_excluded_queries": num_excluded,
    })
    return result


def _check_id_lengths(num_query: int, num_gallery: int, query_codes: torch.Tensor,
                      gallery_codes: torch.Tensor) -> None:
    if len(query_codes) != num_query or len(gallery_codes) != num_gallery:
        raise ValueError(
            f"ids do not match the problem size: {len(query_codes)} query ids for {num_query} "
            f"queries, {len(gallery_codes)} gallery ids for {num_gallery} gallery items")
    if num_gallery == 0:
        raise ValueError("the gallery is empty")


def rank_metrics(distance, query_ids, gallery_ids, ranks=DEFAULT_RANKS, ap="standard",
                 max_rank=None, chunk_size=None) -> dict:
    """CMC, mAP and mINP from a query x gallery distance matrix (smaller = closer).

    Args:
        distance: (Q, G) numpy array or torch tensor, float16/32/64 (any device).
        query_ids, gallery_ids: identity labels of any hashable type (encoded jointly).
        ranks: CMC ranks reported as ``rank{k}``; 1, 5 and 10 are always included.
        ap: ``"standard"`` or ``"trapezoid"`` (see module docstring).
        max_rank: truncate the returned ``cmc`` curve to this many ranks (default: all G).
        chunk_size: query rows per chunk; default from ``CHUNK_MEMORY_BYTES``.

    Returns:
        ``cmc`` (float64 array), ``rank{k}``, ``mAP``, ``mINP`` (floats in [0, 1]),
        ``num_valid_queries`` and ``num_excluded_queries`` (queries whose identity is absent
        from the gallery). Raises ValueError if no query is valid.

    Each row is ranked by a stable ascending sort: equal distances rank the lower gallery index
    first. AP arithmetic is done in float64.
    """
    # Widened chunk by chunk: converting a whole float16 matrix would double its memory.
    distance = _as_matrix(distance, "distance")
    num_query, num_gallery = distance.shape
    query_codes, gallery_codes = _encode_ids(query_ids, gallery_ids)
    _check_id_lengths(num_query, num_gallery, query_codes, gallery_codes)
    step = _chunk_rows(chunk_size, num_gallery)
    chunks = (_widen(distance[start:start + step]) for start in range(0, num_query, step))
    return _rank_metrics_from_chunks(chunks, query_codes, gallery_codes, num_gallery,
                                     ranks, ap, max_rank)


# --------------------------------------------------------------------------------------------
# Features -> distances
# --------------------------------------------------------------------------------------------


def _distance_to_gallery(gallery_features, metric: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Prepare the gallery once; return a function mapping query rows to distance rows."""
    _check_choice(metric, METRICS, "metric")
    gallery = as_float_matrix(gallery_features, "gallery_features")

    def match_dtype(query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if query.shape[1] != gallery.shape[1]:
            raise ValueError(f"feature dimensions differ: query {query.shape[1]}, "
                             f"gallery {gallery.shape[1]}")
        dtype = torch.promote_types(query.dtype, gallery.dtype)
        return query.to(dtype), gallery.to(device=query.device, dtype=dtype)

    if metric == "cosine":
        gallery = F.normalize(gallery, dim=1)

        def cosine(query_features) -> torch.Tensor:
            query, normalised_gallery = match_dtype(as_float_matrix(query_features,
                                                                     "query_features"))
            return 1 - F.normalize(query, dim=1) @ normalised_gallery.T

        return cosine

    if metric == "dot":

        def negative_dot(query_features) -> torch.Tensor:
            query, same_gallery = match_dtype(as_float_matrix(query_features, "query_features"))
            return -(query @ same_gallery.T)

        return negative_dot

    # Centering on the gallery mean leaves distances unchanged but shrinks the norms in the
    # |q|^2 + |g|^2 - 2 q.g expansion, which reduces cancellation error.
    mean = gallery.mean(dim=0, keepdim=True)
    gallery = gallery - mean
    gallery_sq_norms = gallery.pow(2).sum(dim=1)

    def euclidean(query_features) -> torch.Tensor:
        query, centred_gallery = match_dtype(as_float_matrix(query_features, "query_features"))
        query = query - mean.to(query)
        squared = (query.pow(2).sum(dim=1, keepdim=True) + gallery_sq_norms.to(query)[None, :]
                   - 2 * query @ centred_gallery.T)
        return squared.clamp(min=0).sqrt()

    return euclidean


def pairwise_distance(query_features, gallery_features, metric="cosine") -> torch.Tensor:
    """(Q, G) distances: ``cosine`` = 1 - cosine similarity (features L2-normalised inside),
    ``euclidean`` = true Euclidean distance (squared expansion clamped at 0 before sqrt)."""
    return _distance_to_gallery(gallery_features, metric)(query_features)


def rank_metrics_from_features(query_features, gallery_features, query_ids, gallery_ids,
                               metric="cosine", ranks=DEFAULT_RANKS, ap="standard",
                               chunk_size=None, max_rank=None) -> dict:
    """``rank_metrics`` on ``pairwise_distance`` without building the full Q x G matrix.

    Distance rows are computed ``chunk_size`` queries at a time (default from
    ``CHUNK_MEMORY_BYTES``) and fed to the same chunked ranking code as ``rank_metrics``.
    """
    query = as_float_matrix(query_features, "query_features")
    distance_to_gallery = _distance_to_gallery(gallery_features, metric)
    num_gallery = len(gallery_features)
    query_codes, gallery_codes = _encode_ids(query_ids, gallery_ids)
    _check_id_lengths(len(query), num_gallery, query_codes, gallery_codes)
    step = _chunk_rows(chunk_size, num_gallery)

    def chunks() -> Iterator[torch.Tensor]:
        for start in range(0, len(query), step):
            yield distance_to_gallery(query[start:start + step])

    return _rank_metrics_from_chunks(chunks(), query_codes, gallery_codes, num_gallery,
                                     ranks, ap, max_rank)
