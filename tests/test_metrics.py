import numpy as np
import pytest

from hashsearch.bench.metrics import (average_precision, mean_average_precision,
                                      precision_at_k, precision_within_radius, pr_curve_hamming,
                                      rank_by_hamming, recall_at_k)
from hashsearch.codes import code_words, hamming_distances, pack_codes, unpack_codes
from hashsearch.errors import HashsearchError


def codes_of(*bitstrings):
    return pack_codes(np.array([[c == "1" for c in s] for s in bitstrings]))


def brute_rank(q, db, ids):
    qb, bb = unpack_codes(q), unpack_codes(db)
    dist = (qb[:, None, :] != bb[None, :, :]).sum(-1)
    rows = np.array([np.lexsort((ids, d)) for d in dist])
    return rows, np.take_along_axis(dist, rows, 1)


def test_ap_hand_examples():
    rel = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]], bool)
    ap = average_precision(rel)
    assert ap == pytest.approx([(1 + 2 / 3) / 2, 1 / 2, 0.0])
    assert mean_average_precision(rel) == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2) / 3)


def test_ap_over_total_relevant():
    rel = np.array([[1, 0, 1]], bool)
    # Four relevant items exist; two were never retrieved and count as precision 0.
    assert mean_average_precision(rel, n_relevant_total=[4]) == pytest.approx((1 + 2 / 3) / 4)
    assert mean_average_precision(rel, n_relevant_total=[0]) == 0.0


def test_precision_at_k():
    rel = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], bool)
    expected = np.mean([[1, 1 / 2, 2 / 3, 3 / 4], [0, 0, 1 / 3, 1 / 4]], axis=0)
    assert precision_at_k(rel) == pytest.approx(expected)


def test_recall_at_k_counts_the_true_neighbours_found():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, -1], [5, 6, 7, 8]])
    assert recall_at_k(found, truth) == (2 / 4 + 4 / 4) / 2
    assert recall_at_k(truth, truth) == 1.0


def test_recall_at_k_reads_only_the_top_k_and_never_counts_padding():
    assert recall_at_k([[1, 2, -1]], [[2, 3, 4]]) == pytest.approx(1 / 3)
    assert recall_at_k([[9, 8, 2, 3]], [[2, 3]]) == 0.0           # 2 and 3 are past the top 2
    assert recall_at_k([[-1, 5]], [[-1, 5]]) == 0.5                # -1 pads a short truth: it never matches
    assert np.isnan(recall_at_k(np.zeros((0, 10), int), np.zeros((0, 10), int)))


def test_rank_by_hamming_matches_brute_force():
    rng = np.random.default_rng(3)
    for bits in (8, 16, 48):
        q = rng.integers(0, 256, (37, bits // 8), dtype=np.uint8)
        db = rng.integers(0, 256, (300, bits // 8), dtype=np.uint8)
        ids = rng.permutation(10_000)[:300]
        want_rows, want_dist = brute_rank(q, db, ids)
        for k in (1, 25, 300):
            rows, dist = rank_by_hamming(q, db, k, db_ids=ids, block=8)
            assert rows.dtype == np.int64 and dist.dtype == np.int32
            np.testing.assert_array_equal(rows, want_rows[:, :k])
            np.testing.assert_array_equal(dist, want_dist[:, :k])


def test_ties_broken_by_id_then_row():
    db = codes_of("00000000", "00000011", "00000000", "00000000", "00000001")
    q = codes_of("00000000")
    rows, dist = rank_by_hamming(q, db, 5, db_ids=[50, 7, 30, 10, 99])
    assert rows.tolist() == [[3, 2, 0, 4, 1]]
    assert dist.tolist() == [[0, 0, 0, 1, 2]]
    rows, _ = rank_by_hamming(q, db, 3)
    assert rows.tolist() == [[0, 2, 3]]
    # topk beyond the database is clipped rather than padded.
    assert rank_by_hamming(q, db, 50)[0].shape == (1, 5)


@pytest.mark.parametrize("bits", [24, 256])
@pytest.mark.parametrize("numpy_has_bitwise_count", [True, False])
def test_wide_codes_and_numpy_1_match_brute_force(monkeypatch, bits, numpy_has_bitwise_count):
    if not numpy_has_bitwise_count:
        monkeypatch.delattr(np, "bitwise_count", raising=False)     # as on numpy < 2
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 256, (7, bits // 8), dtype=np.uint8)
    db = rng.integers(0, 256, (150, bits // 8), dtype=np.uint8)
    ids = rng.permutation(150)
    want = brute_rank(q, db, ids)
    for got, exp in zip(rank_by_hamming(q, db, 40, db_ids=ids), want):
        np.testing.assert_array_equal(got, exp[:, :40])


@pytest.mark.parametrize("numpy_has_bitwise_count", [True, False])
def test_hamming_distances_broadcast_over_any_leading_axes(monkeypatch, numpy_has_bitwise_count):
    if not numpy_has_bitwise_count:
        monkeypatch.delattr(np, "bitwise_count", raising=False)
    rng = np.random.default_rng(1)
    for k in (12, 64, 200, 4096):
        q = pack_codes(rng.random((5, k)) > 0.5)
        rows = pack_codes(rng.random((5 * 9, k)) > 0.5).reshape(5, 9, -1)
        want = (unpack_codes(q)[:, None, :] != unpack_codes(rows.reshape(45, -1)).reshape(5, 9, -1)).sum(-1)
        # the engine's shape: each query against its own candidates
        np.testing.assert_array_equal(hamming_distances(q[:, None, :], rows), want)
        # the scanner's: every query against every row, the rows given as words
        flat = rows.reshape(45, -1)
        all_pairs = hamming_distances(code_words(q)[:, None, :], code_words(flat)[None])
        np.testing.assert_array_equal(all_pairs.reshape(5, 5, 9)[np.arange(5), np.arange(5)], want)
        assert all_pairs.max() <= k
    with pytest.raises(HashsearchError, match="codes of 9 and 10 bytes cannot be compared"):
        hamming_distances(np.zeros((1, 9), np.uint8), np.zeros((1, 10), np.uint8))


def test_rank_rejects_mismatched_bits():
    with pytest.raises(HashsearchError, match=r"query codes of shape \(1, 2\) do not hold 8-bit codes"):
        rank_by_hamming(np.zeros((1, 2), np.uint8), np.zeros((4, 1), np.uint8), 2)


def test_precision_within_radius_hand_example():
    db = codes_of("00000000", "00000011", "00000111", "11111111", "11111110")
    db_labels = np.array([0, 0, 1, 1, 1])
    q = codes_of("00000000", "11111111", "00001111")
    q_labels = np.array([0, 1, 0])
    # q0 finds rows 0, 1 (both label 0): 1.  q1 finds rows 3, 4 (label 1): 1.
    # q2 is at distances 4, 2, 1, 4, 5: rows 1, 2 with labels 0, 1: 1/2.
    assert precision_within_radius(q, db, q_labels, db_labels, 2) == pytest.approx((1 + 1 + 0.5) / 3)
    # Radius 0: q0 finds row 0 (1), q1 row 3 (1), q2 nothing (0).
    assert precision_within_radius(q, db, q_labels, db_labels, 0) == pytest.approx(2 / 3)


def test_pr_curve_micro_average():
    db = codes_of("00000000", "00000011", "11111111")
    q = codes_of("00000000")
    radius, precision, recall = pr_curve_hamming(q, db, [0], [0, 1, 0])
    assert len(radius) == 9
    # Distances 0 (rel), 2 (not), 8 (rel).
    assert precision[0] == 1 and precision[2] == pytest.approx(1 / 2) and precision[8] == pytest.approx(2 / 3)
    assert recall[0] == pytest.approx(1 / 2) and recall[7] == pytest.approx(1 / 2) and recall[8] == 1
    assert np.all(np.diff(recall) >= 0)


def test_codes_of_any_length_pack_with_zero_padding_bits():
    from hashsearch.codes import code_bytes
    rng = np.random.default_rng(0)
    for k in (1, 12, 32, 48, 60):
        bits = rng.random((9, k)) > 0.5
        packed = pack_codes(bits)
        assert packed.shape == (9, code_bytes(k)) == (9, (k + 7) // 8)
        np.testing.assert_array_equal(unpack_codes(packed, k), bits)
        assert not unpack_codes(packed)[:, k:].any()          # spare bits are 0
