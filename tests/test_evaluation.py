import numpy as np
import pytest
import torch

from tune_clipfh.bench.evaluator import reference_rank_metrics
from tune_clipfh.evaluation import (
    UPSTREAM_COLUMNS,
    evaluate_splits,
    expected_rank1,
    flip_average,
    pairwise_distance,
    rank_metrics,
    rank_metrics_from_features,
    upstream_table_row,
)

# Hand-computed case. Gallery ids: g0=a, g1=b, g2=a, g3=c.
#   q0 (a): order g1 g3 g2 g0 -> hits at ranks 3 and 4.
#       standard AP = (1/3 + 2/4) / 2 = 5/12; INP = 2/4;
#       trapezoid: hit 1 (1/3 + 0/2)/2 = 1/6, hit 2 (2/4 + 1/3)/2 = 5/12 -> (1/6 + 5/12)/2 = 7/24.
#   q1 (b): order g1 ... -> hit at rank 1: AP = INP = trapezoid = 1.
#   q2 (c): order g0 g2 g3 g1 -> hit at rank 3: AP = INP = 1/3, trapezoid = 1/(2*3) = 1/6.
# First-hit ranks 3, 1, 3 -> CMC = [1/3, 1/3, 1, 1].
# mAP = (5/12 + 1 + 1/3)/3 = 7/12; mINP = (1/2 + 1 + 1/3)/3 = 11/18;
# trapezoid mAP = (7/24 + 1 + 1/6)/3 = 35/72.
HAND_DISTANCE = np.array([
    [0.4, 0.1, 0.3, 0.2],
    [0.9, 0.2, 0.5, 0.7],
    [0.1, 0.6, 0.2, 0.3],
])
HAND_QUERY_IDS = ["a", "b", "c"]
HAND_GALLERY_IDS = ["a", "b", "a", "c"]


def single_positive_distance(rank, num_gallery=6):
    """One query whose only positive (gallery item 0) is at the given 1-based rank."""
    # Item 0 sits between the negatives at distances rank - 1 and rank.
    distance = np.concatenate([[rank - 0.5], np.arange(1, num_gallery, dtype=float)])
    return distance[None, :], [0], list(range(num_gallery))


def test_hand_computed_standard():
    result = rank_metrics(HAND_DISTANCE, HAND_QUERY_IDS, HAND_GALLERY_IDS)
    np.testing.assert_allclose(result["cmc"], [1 / 3, 1 / 3, 1, 1])
    assert result["rank1"] == pytest.approx(1 / 3)
    assert result["rank5"] == result["rank10"] == 1.0  # beyond the 4-item gallery
    assert result["mAP"] == pytest.approx(7 / 12)
    assert result["mINP"] == pytest.approx(11 / 18)
    assert (result["num_valid_queries"], result["num_excluded_queries"]) == (3, 0)


def test_hand_computed_trapezoid():
    result = rank_metrics(HAND_DISTANCE, HAND_QUERY_IDS, HAND_GALLERY_IDS, ap="trapezoid")
    assert result["mAP"] == pytest.approx(35 / 72)
    assert result["mINP"] == pytest.approx(11 / 18)  # mINP does not depend on the AP mode


@pytest.mark.parametrize("rank", [1, 2, 3, 6])
def test_single_positive_ap_is_reciprocal_rank(rank):
    distance, query_ids, gallery_ids = single_positive_distance(rank)
    standard = rank_metrics(distance, query_ids, gallery_ids)
    trapezoid = rank_metrics(distance, query_ids, gallery_ids, ap="trapezoid")
    assert standard["mAP"] == pytest.approx(1 / rank)
    assert standard["mINP"] == pytest.approx(1 / rank)
    assert trapezoid["mAP"] == pytest.approx(1.0 if rank == 1 else 1 / (2 * rank))


@pytest.mark.parametrize(("num_query", "num_gallery", "num_ids"), [(50, 80, 12), (300, 500, 40)])
def test_matches_bruteforce_reference(num_query, num_gallery, num_ids):
    rng = np.random.default_rng(num_query)
    distance = rng.random((num_query, num_gallery))  # continuous: no ties
    query_ids = rng.integers(0, num_ids, num_query)
    gallery_ids = rng.integers(0, num_ids, num_gallery)
    expected = reference_rank_metrics(distance, query_ids, gallery_ids)

    result = rank_metrics(distance, query_ids, gallery_ids)

    np.testing.assert_allclose(result["cmc"], expected["cmc"], atol=1e-6)
    assert result["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert result["mINP"] == pytest.approx(expected["mINP"], abs=1e-6)
    for k in (1, 5, 10):
        assert result[f"rank{k}"] == pytest.approx(expected["cmc"][k - 1], abs=1e-6)


def test_ties_rank_lower_gallery_index_first():
    distance = np.array([[0.5, 0.2, 0.5, 0.5]])
    # Order is g1, then the tied g0, g2, g3 by index.
    assert rank_metrics(distance, ["x"], ["a", "b", "x", "c"])["mAP"] == pytest.approx(1 / 3)
    assert rank_metrics(distance, ["x"], ["x", "b", "a", "c"])["mAP"] == pytest.approx(1 / 2)
    assert rank_metrics(distance, ["x"], ["a", "b", "c", "x"])["mAP"] == pytest.approx(1 / 4)


def test_input_types_and_precisions_agree():
    rng = np.random.default_rng(1)
    distance = rng.random((40, 60)).astype(np.float16)
    query_ids = rng.integers(0, 8, 40)
    gallery_ids = rng.integers(0, 8, 60)
    expected = rank_metrics(distance.astype(np.float64), query_ids, gallery_ids)
    for variant in (distance, distance.astype(np.float32), torch.from_numpy(distance)):
        result = rank_metrics(variant, torch.from_numpy(query_ids), gallery_ids)
        np.testing.assert_array_equal(result["cmc"], expected["cmc"])
        assert result["mAP"] == pytest.approx(expected["mAP"], abs=1e-12)


def test_string_and_int_ids_are_distinct_labels():
    distance = np.array([[0.1, 0.2]])
    # The int 1 and the string "1" are different identities.
    assert rank_metrics(distance, [1], ["1", 1])["mAP"] == pytest.approx(1 / 2)
    assert rank_metrics(distance, ["1"], ["1", 1])["mAP"] == pytest.approx(1.0)


def test_absent_query_identity_is_excluded_and_counted():
    with_absent = rank_metrics(
        np.vstack([HAND_DISTANCE, [0.1, 0.1, 0.1, 0.1]]), HAND_QUERY_IDS + ["zzz"],
        HAND_GALLERY_IDS)
    assert (with_absent["num_valid_queries"], with_absent["num_excluded_queries"]) == (3, 1)
    assert with_absent["mAP"] == pytest.approx(7 / 12)
    np.testing.assert_allclose(with_absent["cmc"], [1 / 3, 1 / 3, 1, 1])


def test_no_valid_query_raises():
    with pytest.raises(ValueError, match="no valid queries"):
        rank_metrics(np.zeros((2, 3)), [7, 8], [1, 2, 3])


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="standard, trapezoid"):
        rank_metrics(HAND_DISTANCE, HAND_QUERY_IDS, HAND_GALLERY_IDS, ap="sklearn")
    with pytest.raises(ValueError, match="ids do not match"):
        rank_metrics(HAND_DISTANCE, HAND_QUERY_IDS[:2], HAND_GALLERY_IDS)
    with pytest.raises(ValueError, match="chunk_size"):
        rank_metrics(HAND_DISTANCE, HAND_QUERY_IDS, HAND_GALLERY_IDS, chunk_size=-1)
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics(np.full((1, 2), np.nan), ["a"], ["a", "b"])


def test_extra_ranks_and_max_rank():
    result = rank_metrics(HAND_DISTANCE, HAND_QUERY_IDS, HAND_GALLERY_IDS, ranks=(2, 3),
                          max_rank=2)
    np.testing.assert_allclose(result["cmc"], [1 / 3, 1 / 3])
    assert result["rank2"] == pytest.approx(1 / 3)
    assert result["rank3"] == 1.0  # computed from the full curve, not the truncated one
    assert {"rank1", "rank5", "rank10"} <= result.keys()


def test_chunked_equals_single_chunk():
    rng = np.random.default_rng(2)
    distance = rng.random((37, 50))
    query_features = rng.normal(size=(37, 16))
    gallery_features = rng.normal(size=(50, 16))
    query_ids = rng.integers(0, 6, 37)
    gallery_ids = rng.integers(0, 6, 50)
    for ap in ("standard", "trapezoid"):
        whole = rank_metrics(distance, query_ids, gallery_ids, ap=ap, chunk_size=37)
        whole_features = rank_metrics_from_features(
            query_features, gallery_features, query_ids, gallery_ids, ap=ap, chunk_size=37)
        for chunk_size in (1, 4):
            chunked = rank_metrics(distance, query_ids, gallery_ids, ap=ap, chunk_size=chunk_size)
            chunked_features = rank_metrics_from_features(
                query_features, gallery_features, query_ids, gallery_ids, ap=ap,
                chunk_size=chunk_size)
            for expected, result in ((whole, chunked), (whole_features, chunked_features)):
                np.testing.assert_array_equal(result["cmc"], expected["cmc"])
                for key in ("mAP", "mINP", "num_valid_queries", "num_excluded_queries"):
                    assert result[key] == expected[key]


def test_pairwise_distance_values():
    rng = np.random.default_rng(3)
    query = torch.from_numpy(rng.normal(size=(5, 8)))
    gallery = torch.from_numpy(rng.normal(size=(7, 8)) + 10)  # a large common offset
    cosine = torch.nn.functional.cosine_similarity(query[:, None], gallery[None], dim=-1)
    torch.testing.assert_close(pairwise_distance(query, gallery), 1 - cosine)
    torch.testing.assert_close(pairwise_distance(query, gallery, "euclidean"),
                               torch.cdist(query, gallery))
    # Identical rows: the clamp keeps the distance at 0 instead of NaN from sqrt(-eps).
    self_distance = pairwise_distance(gallery.float(), gallery.float(), "euclidean")
    assert not self_distance.isnan().any()
    assert self_distance.diagonal().abs().max() < 1e-2


def test_cosine_and_euclidean_rank_normalised_features_alike():
    rng = np.random.default_rng(4)
    query = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(60, 32))), dim=1)
    gallery = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(90, 32))), dim=1)
    query_ids = rng.integers(0, 10, 60)
    gallery_ids = rng.integers(0, 10, 90)
    cosine = rank_metrics_from_features(query, gallery, query_ids, gallery_ids, metric="cosine")
    euclidean = rank_metrics_from_features(query, gallery, query_ids, gallery_ids,
                                           metric="euclidean")
    np.testing.assert_array_equal(cosine["cmc"], euclidean["cmc"])
    assert cosine["mAP"] == pytest.approx(euclidean["mAP"], abs=1e-12)
    assert cosine["mINP"] == pytest.approx(euclidean["mINP"], abs=1e-12)
    from_matrix = rank_metrics(pairwise_distance(query, gallery), query_ids, gallery_ids)
    assert from_matrix["mAP"] == pytest.approx(cosine["mAP"], abs=1e-12)


def test_invalid_metric_raises():
    with pytest.raises(ValueError, match="cosine, euclidean, dot"):
        pairwise_distance(torch.ones(2, 3), torch.ones(2, 3), metric="manhattan")
    with pytest.raises(ValueError, match="cosine, euclidean, dot"):
        rank_metrics_from_features(torch.ones(2, 3), torch.ones(2, 3), [0, 1], [0, 1],
                                   metric="hamming")


def test_dot_metric_ranks_by_unnormalised_dot_product():
    query = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[0.5, 0.0], [2.0, 2.0]])  # cosine prefers 0, dot prefers 1
    assert pairwise_distance(query, gallery, "dot").tolist() == [[-0.5, -2.0]]
    assert rank_metrics_from_features(query, gallery, [1], [0, 1], metric="dot")["rank1"] == 1
    assert rank_metrics_from_features(query, gallery, [1], [0, 1])["rank1"] == 0


def test_flip_average():
    images = torch.arange(12.0).reshape(1, 1, 3, 4)

    def first_column(batch):
        return batch[..., 0].flatten(1)

    expected = (images[..., 0] + images[..., -1]).flatten(1) / 2
    torch.testing.assert_close(flip_average(first_column, images), expected)


def splits_example():
    """Seven samples on the unit circle (cosine distance = angle order) and two splits.

    Split 1 (queries 0, 2, 4; gallery 1, 3, 5): every query's nearest item is its positive.
    Split 2 (queries 1, 3, 5; gallery 0, 2, 6): row 6 is an "r" sample at angle 2.1, so
      q1 (0.1, p): 0 (p) first -> rank 1;
      q3 (2.2, q): 6 (r, 0.1 away) before 2 (q, 0.2 away) -> rank 2;
      q5 (4.3, r): 0 (p, 1.98 away) before 6 (r, 2.2 away) -> rank 2.
    So split 1 has R1 = mAP = 1, split 2 has R1 = 1/3 and mAP = (1 + 1/2 + 1/2)/3 = 2/3.
    """
    angles = np.array([0.0, 0.1, 2.0, 2.2, 4.0, 4.3, 2.1])
    features = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    ids = ["p", "p", "q", "q", "r", "r", "r"]
    splits = [([0, 2, 4], [1, 3, 5]), ([1, 3, 5], [0, 2, 6])]
    return features, ids, splits


def test_evaluate_splits_per_split_and_aggregates():
    features, ids, splits = splits_example()
    result = evaluate_splits(features, ids, splits)

    assert len(result["per_split"]) == 2
    for (query_rows, gallery_rows), split_result in zip(splits, result["per_split"], strict=True):
        direct = rank_metrics_from_features(
            features[query_rows], features[gallery_rows], [ids[i] for i in query_rows],
            [ids[i] for i in gallery_rows])
        assert split_result["mAP"] == direct["mAP"]
        np.testing.assert_array_equal(split_result["cmc"], direct["cmc"])
    first, second = result["per_split"]
    assert first["rank1"] == first["mAP"] == 1.0
    assert second["rank1"] == pytest.approx(1 / 3)
    assert second["mAP"] == pytest.approx(2 / 3)
    assert result["mean"]["rank1"] == pytest.approx(2 / 3)
    assert result["mean"]["mAP"] == pytest.approx(5 / 6)
    assert result["std"]["rank1"] == pytest.approx(np.std([1, 1 / 3], ddof=1))
    np.testing.assert_allclose(result["cmc_mean"], [2 / 3, 1, 1])


def test_evaluate_splits_single_split_and_inputs():
    features, ids, splits = splits_example()
    one = evaluate_splits(features, ids, splits[:1])
    assert one["std"] == dict.fromkeys(one["mean"], 0.0)
    as_mapping = evaluate_splits(dict(enumerate(features)), ids, splits[:1])
    assert as_mapping["mean"] == one["mean"]
    with pytest.raises(ValueError, match="both query and gallery"):
        evaluate_splits(features, ids, [([0, 1], [1, 2])])


def test_upstream_table_row():
    features, ids, splits = splits_example()
    row = upstream_table_row(evaluate_splits(features, ids, splits))

    assert len(UPSTREAM_COLUMNS) == 44
    assert UPSTREAM_COLUMNS[:4] == ("split1_R1", "split1_R5", "split1_R10", "split1_mAP")
    assert UPSTREAM_COLUMNS[-4:] == ("final_R1", "final_R5", "final_R10", "final_mAP")
    assert tuple(row) == UPSTREAM_COLUMNS
    assert (row["split1_R1"], row["split1_mAP"]) == (100.0, 100.0)
    assert (row["split2_R1"], row["split2_R5"], row["split2_mAP"]) == (33.33, 100.0, 66.67)
    assert (row["final_R1"], row["final_mAP"]) == (66.67, 83.33)
    assert row["split3_R1"] is None  # only two splits evaluated


# ------------------------------------------------------------------------------------------
# Expected Rank-1 over every gallery draw


def test_expected_rank1_by_hand():
    """Two identities on a line: a = {0, 1}, b = {3, 1.5}. Query 0 (positive 1): b's images
    are farther (3, 1.5 > 1): e = 0, hit. Query 1 (positive 0, distance 1): b's 1.5 is at 0.5,
    closer: e = 1/2. Query 3 (positive 1.5, distance 1.5): a's 1 is at 2, a's 0 at 3: e = 0.
    Query 1.5 (positive 3, distance 1.5): a's 1 at 0.5 and a's 0 at 1.5 (a tie: half):
    e = 3/4. With N = 2: R1 = mean(1, 1/2, 1, 1/4) = 0.6875."""
    features = torch.tensor([[0.0], [1.0], [3.0], [1.5]])
    ids = ["a", "a", "b", "b"]
    assert expected_rank1(features, ids, 2, metric="euclidean") == pytest.approx(0.6875)
    # three impostors drawn like the one: each factor cubed
    assert expected_rank1(features, ids, 4, metric="euclidean") == \
        pytest.approx((1 + 0.5**3 + 1 + 0.25**3) / 4)


def test_expected_rank1_is_the_mean_split_rank1_over_gallery_draws():
    rng = np.random.default_rng(0)
    identities, images = 12, 5
    labels = np.repeat(np.arange(identities), images)
    features = rng.normal(size=(identities, 16))[labels] + 1.2 * rng.normal(size=(len(labels), 16))
    ids = labels.astype(str)
    draws = []
    for _ in range(1500):
        gallery = [rng.integers(images) + k * images for k in range(identities)]
        query = np.setdiff1d(np.arange(len(labels)), gallery)
        draws.append(rank_metrics_from_features(features[query], features[gallery], ids[query],
                                                ids[gallery])["rank1"])
    expected = expected_rank1(features, ids, identities)
    assert abs(expected - np.mean(draws)) < 4 * np.std(draws) / np.sqrt(len(draws))
    # a larger gallery is harder; perfect separation stays perfect
    assert expected_rank1(features, ids, 80) < expected
    separated = np.eye(identities)[labels] * 10 + 0.01 * rng.normal(size=(len(labels), 12))
    assert expected_rank1(separated, ids, 500) == pytest.approx(1.0)


def test_expected_rank1_errors():
    with pytest.raises(ValueError, match="at least 2"):
        expected_rank1(np.zeros((4, 2)), ["a", "a", "b", "b"], 1)
    with pytest.raises(ValueError, match="two identities"):
        expected_rank1(np.ones((3, 2)), ["a", "a", "a"], 5)
