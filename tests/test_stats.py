"""Statistics of evaluation summaries: intervals, paired comparisons and exact tests, against hand computations."""

from __future__ import annotations

import math
import random

import pytest

from grpo_llm_eval.evaluation import stats

Z95 = 1.959963984540054


def wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 / (1 + Z95**2 / n) * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n**2))
    return max(0.0, centre - half), min(1.0, centre + half)


class TestWilsonInterval:
    @pytest.mark.parametrize(("k", "n"), [(5, 10), (0, 10), (10, 10), (1, 3), (37, 120)])
    def test_matches_the_formula(self, k, n):
        assert stats.wilson_interval(k, n) == pytest.approx(wilson_by_hand(k, n), abs=1e-12)

    def test_known_values(self):
        # Wilson (1927) 95 % interval for 0/10 is [0, 0.2775]; for 5/10 [0.2366, 0.7634].
        assert stats.wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
        assert stats.wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)

    def test_all_right_is_not_a_point_interval(self):
        low, high = stats.wilson_interval(8, 8)
        assert high == 1.0 and low < 0.7

    def test_no_observations_give_no_interval(self):
        assert stats.wilson_interval(0, 0) is None


class TestClusterBootstrap:
    def test_interval_contains_the_mean(self):
        rng = random.Random(1)
        values = [[rng.gauss(3.0, 1.0)] for _ in range(50)]
        low, high = stats.cluster_bootstrap_ci(values, seed=0)
        assert low < stats.pooled_mean(values) < high

    def test_interval_shrinks_like_one_over_root_n(self):
        rng = random.Random(2)
        small = [[rng.gauss(0, 1)] for _ in range(25)]
        large = [[rng.gauss(0, 1)] for _ in range(2500)]
        width = [hi - lo for lo, hi in (stats.cluster_bootstrap_ci(v, seed=0) for v in (small, large))]
        assert 5 < width[0] / width[1] < 20  # sqrt(100) = 10

    def test_same_seed_same_interval_and_another_seed_another(self):
        values = [[float(i % 7), float(i % 3)] for i in range(30)]
        assert stats.cluster_bootstrap_ci(values, seed=5) == stats.cluster_bootstrap_ci(values, seed=5)
        assert stats.cluster_bootstrap_ci(values, seed=5) != stats.cluster_bootstrap_ci(values, seed=6)

    def test_a_prompts_samples_are_resampled_together(self):
        # K identical samples per prompt carry no more information than one: the interval must not shrink.
        rng = random.Random(3)
        one = [[rng.random()] for _ in range(40)]
        four = [c * 4 for c in one]
        assert stats.cluster_bootstrap_ci(four, seed=0) == pytest.approx(stats.cluster_bootstrap_ci(one, seed=0))

    def test_missing_values_are_left_out_of_the_pooled_mean(self):
        assert stats.pooled_mean([[1.0, None], [0.0, 0.0], [None]]) == pytest.approx(1 / 3)
        assert stats.pooled_mean([[None], []]) is None
        assert stats.cluster_bootstrap_ci([[None]], seed=0) is None

    def test_constant_values_give_a_point_interval(self):
        assert stats.cluster_bootstrap_ci([[2.0], [2.0], [2.0]], seed=0) == (2.0, 2.0)


class TestExactTests:
    @pytest.mark.parametrize(("k", "n", "expected"), [
        (0, 5, 2 / 32),                    # 2 * (1/2)^5
        (1, 10, 2 * (1 + 10) / 1024),      # 0.021484375
        (9, 10, 2 * (1 + 10) / 1024),      # symmetric
        (2, 11, 2 * (1 + 11 + 55) / 2048),  # 0.0654296875
        (3, 6, 1.0),                       # capped at 1
        (0, 0, 1.0),
    ])
    def test_two_sided_binomial_p_value_matches_hand_computation(self, k, n, expected):
        assert stats.binomial_two_sided_p(k, n) == pytest.approx(expected, rel=1e-12)

    def test_sign_test_drops_ties(self):
        diffs = [0.5, 0.2, 0.0, 0.0, 1.0, -0.1, 0.3, 0.0]  # 4 up, 1 down, 3 ties
        assert stats.sign_test_p(diffs) == pytest.approx(2 * (1 + 5) / 32)

    def test_mcnemar_counts_only_discordant_pairs(self):
        # A right and B wrong on 2 prompts, the reverse on 9: p = 2 * P(X <= 2), X ~ Bin(11, 1/2).
        assert stats.mcnemar_exact_p(2, 9) == pytest.approx(134 / 2048)
        assert stats.mcnemar_exact_p(9, 2) == stats.mcnemar_exact_p(2, 9)


class TestPairedComparison:
    def test_difference_has_the_sign_of_b_minus_a(self):
        better = stats.paired_bootstrap([0.5, 1.0, 0.0, 0.5, 1.0, 0.5] * 5, seed=0)
        worse = stats.paired_bootstrap([-0.5, -1.0, 0.0, -0.5, -1.0, -0.5] * 5, seed=0)
        assert better.diff > 0 and better.low > 0
        assert worse.diff < 0 and worse.high < 0
        assert better.p_value < 0.01 and worse.p_value < 0.01

    def test_identical_models_have_no_difference_and_p_one(self):
        result = stats.paired_bootstrap([0.0] * 20, seed=0)
        assert (result.diff, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)

    def test_noise_around_zero_is_not_significant(self):
        rng = random.Random(4)
        result = stats.paired_bootstrap([rng.gauss(0, 1) for _ in range(40)], seed=0)
        assert result.low < 0 < result.high and result.p_value > 0.05

    def test_bootstrap_p_value_is_bounded_by_resamples(self):
        result = stats.paired_bootstrap([1.0] * 10 + [2.0] * 10, seed=0)
        assert result.p_value == pytest.approx(1 / (1 + stats.BOOTSTRAP_RESAMPLES))

    def test_sign_variant_keeps_the_interval_and_takes_the_exact_p_value(self):
        diffs = [1.0, 1.0, 1.0, 0.0, -1.0, 1.0, 1.0]
        boot, sign = stats.paired_bootstrap(diffs, seed=0), stats.paired_sign(diffs, seed=0)
        assert (sign.diff, sign.low, sign.high) == (boot.diff, boot.low, boot.high)
        assert sign.p_value == pytest.approx(2 * (1 + 6) / 64)

    def test_no_common_prompt_gives_no_result(self):
        assert stats.paired_bootstrap([], seed=0) is None


class TestRocAuc:
    def test_equals_the_share_of_right_wrong_pairs_ordered_correctly_ties_half(self):
        rng = random.Random(3)
        for _ in range(20):
            n = rng.randint(2, 40)
            scores = [rng.randint(0, 5) for _ in range(n)]  # many ties
            labels = [rng.random() < 0.4 for _ in range(n)]
            pos = [s for s, y in zip(scores, labels, strict=True) if y]
            neg = [s for s, y in zip(scores, labels, strict=True) if not y]
            if not pos or not neg:
                assert stats.roc_auc(scores, labels) is None
                continue
            brute = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg) / (len(pos) * len(neg))
            assert stats.roc_auc(scores, labels) == pytest.approx(brute)

    def test_curve_runs_from_origin_to_one_and_its_area_is_the_auc(self):
        scores, labels = [0.9, 0.7, 0.7, 0.4, 0.2, 0.1], [True, True, False, True, False, False]
        curve = stats.roc_curve(scores, labels)
        assert curve[0] == (0.0, 0.0) and curve[-1] == (1.0, 1.0)
        area = sum((x2 - x1) * (y1 + y2) / 2 for (x1, y1), (x2, y2) in zip(curve[:-1], curve[1:], strict=True))
        assert area == pytest.approx(stats.roc_auc(scores, labels))

    def test_bootstrap_interval_holds_the_estimate_and_needs_two_clusters(self):
        rng = random.Random(0)
        clusters = [[(rng.random() + (0.5 if y else 0), y) for y in (True, False, rng.random() < 0.5)]
                    for _ in range(30)]
        flat = [p for c in clusters for p in c]
        auc = stats.roc_auc([p[0] for p in flat], [p[1] for p in flat])
        low, high = stats.auc_bootstrap_ci(clusters, seed=1)
        assert low <= auc <= high and 0.5 < low
        assert stats.auc_bootstrap_ci([[(1.0, True), (0.0, False)]]) is None


class TestRankCorrelation:
    def test_spearman_is_pearson_on_ranks_and_none_when_undefined(self):
        assert stats.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)  # monotone, not linear
        assert stats.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
        assert stats.spearman([1, 2, 3], [5, 5, 5]) is None and stats.spearman([1, 2], [1, 2]) is None
        # ties share their average rank: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4)
        assert stats.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(stats.pearson([1, 2.5, 2.5, 4], [1, 2, 3, 4]))
