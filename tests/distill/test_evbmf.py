"""EVBMF, the bounded minimizer, knowledge gain and mapping condition (method.md §4.4)."""

import math

import numpy as np
import pytest
import torch

from histokt.distill.evbmf import (
    DEFAULT_SEARCH,
    SEARCHES,
    evbmf,
    fold,
    knowledge_gain,
    layer_metrics,
    low_rank,
    mapping_condition,
    minimize_bounded,
    noise_objective,
    noise_objective_grid,
    unfold,
    unfolding_metrics,
)

# ------------------------------------------------------------------------------------------ minimizer


@pytest.mark.parametrize(
    "f, lo, hi, expected, tol",
    [
        (lambda x: (x - 2) ** 2, 0.0, 5.0, 2.0, 1e-6),  # smooth, interior: parabolic steps
        (math.cos, 2.0, 5.0, math.pi, 1e-5),  # pi, not a bound
        (lambda x: abs(x - 0.3), 0.0, 1.0, 0.3, 1e-5),  # kink: golden-section steps
        (lambda x: x, 1.0, 3.0, 1.0, 1e-5),  # monotone: the lower bound (within xatol)
        (lambda x: -x, 1.0, 3.0, 3.0, 1e-5),  # the upper bound
        (lambda x: (x - 1e-3) ** 2 + 1, 0.0, 1.0, 1e-3, 1e-5),  # near a bound
    ],
)
def test_minimizer_known_functions(f, lo, hi, expected, tol):
    m = minimize_bounded(f, lo, hi)
    assert m.converged and lo <= m.x <= hi
    assert abs(m.x - expected) < tol
    assert m.fun == pytest.approx(f(m.x))


def test_minimizer_tolerance_iterations_and_bad_bounds():
    quartic = lambda x: (x - 0.123456789) ** 4  # flat bottom, no help from parabolas
    coarse, fine = minimize_bounded(quartic, -1, 1), minimize_bounded(quartic, -1, 1, xatol=1e-10)
    assert abs(fine.x - 0.123456789) < 1e-3 and fine.nfev > coarse.nfev
    capped = minimize_bounded(quartic, -1, 1, maxiter=3)
    assert not capped.converged and capped.nfev == 3
    assert minimize_bounded(lambda x: x * x, 2.0, 2.0).x == 2.0  # degenerate interval
    with pytest.raises(ValueError):
        minimize_bounded(lambda x: x, 1.0, 0.0)


# ---------------------------------------------------------------------------------------------- EVBMF


def low_rank_plus_noise(L, M, r, sigma, rng, spread=(3.0, 6.0)):
    """Rank-r signal with singular values 3-6x the VB noise edge sigma*(sqrt L + sqrt M), plus noise."""
    u, _ = np.linalg.qr(rng.standard_normal((L, r)))
    v, _ = np.linalg.qr(rng.standard_normal((M, r)))
    s = np.linspace(*spread, r) * sigma * (math.sqrt(L) + math.sqrt(M))
    signal = (u * s) @ v.T
    return signal, signal + sigma * rng.standard_normal((L, M))


@pytest.mark.parametrize(
    "L, M, r", [(20, 50, 5), (50, 20, 5), (64, 576, 10), (576, 64, 10), (128, 1152, 40), (100, 100, 10), (200, 30, 1)]
)
def test_evbmf_recovers_rank_and_noise(L, M, r):
    rng = np.random.default_rng(L * 1000 + M + r)
    _, y = low_rank_plus_noise(L, M, r, 0.1, rng)
    res = evbmf(y)
    assert res.rank == r
    assert res.sigma2 == pytest.approx(0.01, rel=0.1)
    assert np.all(res.d < res.s[:r]) and np.all(res.d > 0)  # shrunk, but kept
    assert res.threshold == pytest.approx(math.sqrt(max(L, M) * res.sigma2 * _xbar(L, M)))


def _xbar(L, M):
    alpha = min(L, M) / max(L, M)
    tau = 2.5129 * math.sqrt(alpha)
    return (1 + tau) * (1 + alpha / tau)


def test_pure_noise_keeps_nothing_and_zero_matrix_is_safe():
    rng = np.random.default_rng(1)
    assert evbmf(0.05 * rng.standard_normal((64, 576))).rank == 0
    res = evbmf(np.zeros((8, 20)))
    assert res.rank == 0 and res.d.size == 0


def test_evbmf_is_transpose_invariant_and_spectrum_matches_svd():
    rng = np.random.default_rng(2)
    _, y = low_rank_plus_noise(40, 90, 6, 0.2, rng)
    a, b = evbmf(y), evbmf(y.T)
    assert a.rank == b.rank == 6
    np.testing.assert_allclose(a.d, b.d, rtol=1e-10)
    np.testing.assert_allclose(a.s, np.linalg.svd(y, compute_uv=False), rtol=1e-10)


def test_given_sigma2_hand_computed():
    """4 x 100, singular values 10, 6, 3, 0.5, sigma2 = 0.01 (no minimization), by hand:
    alpha = 0.04, tau_bar = 2.5129 * 0.2 = 0.50258, x_bar = 1.50258 * (1 + 0.04/0.50258) = 1.622169,
    gamma = sqrt(100 * 0.01 * 1.622169) = 1.27364 -> keep 10, 6, 3 (r = 3);
    d(10) = 5 * (0.9896 + sqrt(0.9896^2 - 1.6e-5)) = 9.895960, d(6) = 5.826476, d(3) = 2.651657."""
    y = np.zeros((4, 100))
    y[np.arange(4), np.arange(4)] = [10, 6, 3, 0.5]
    res = evbmf(y, sigma2=0.01)
    assert res.rank == 3 and res.threshold == pytest.approx(1.273644, abs=1e-6)
    np.testing.assert_allclose(res.d, [9.895960, 5.826476, 2.651657], atol=1e-6)
    # G = (1 + 5.826476/9.895960 + 2.651657/9.895960) / 4, kappa = 9.895960 / 2.651657
    assert knowledge_gain(res.d, 4) == pytest.approx(0.464182, abs=1e-6)
    assert mapping_condition(res.d) == pytest.approx(3.731990, abs=1e-6)


def test_knowledge_gain_and_condition_formulas():
    assert knowledge_gain([5, 4, 1], 8) == pytest.approx((1 + 0.8 + 0.2) / 8)
    assert knowledge_gain([5, 4, 1], 8, p=2) == pytest.approx((1 + 0.64 + 0.04) / 8)
    assert mapping_condition([5, 4, 1]) == pytest.approx(5.0)
    assert mapping_condition([5, 4, 1], p=2) == pytest.approx(25.0)
    assert knowledge_gain([], 8) == 0.0 and mapping_condition([]) == 0.0


def rank3_weight(n_out, n_in, k, s=(10.0, 6.0, 3.0), noise=1e-7, seed=0):
    """W = sum_h s_h a_h (x) b_h (x) c: both unfoldings have singular values exactly s (plus ~0 noise)."""
    rng = np.random.default_rng(seed)
    a, _ = np.linalg.qr(rng.standard_normal((n_out, len(s))))
    b, _ = np.linalg.qr(rng.standard_normal((n_in, len(s))))
    c = rng.standard_normal(k * k)
    c /= np.linalg.norm(c)
    w = np.einsum("h,oh,ih,k->oik", np.asarray(s), a, b, c).reshape(n_out, n_in, k, k)
    return w + noise * rng.standard_normal(w.shape)


def test_layer_metrics_noise_free_by_hand():
    """Noise ~ 0, so d ~ s = 10, 6, 3 in both unfoldings: G_d = (1 + 0.6 + 0.3)/N_d, kappa = 10/3.
    8 out and 4 in channels: G_out = 1.9/8, G_in = 1.9/4, G = (0.2375 + 0.475)/2 = 0.35625."""
    m = layer_metrics(torch.from_numpy(rank3_weight(8, 4, 3)).float())
    assert (m.inp.rank, m.out.rank) == (3, 3)
    assert (m.inp.channels, m.out.channels) == (4, 8)
    assert m.out.kg == pytest.approx(0.2375, abs=1e-3) and m.inp.kg == pytest.approx(0.475, abs=1e-3)
    assert m.kg == pytest.approx(0.35625, abs=1e-3)
    assert m.inp.kappa == pytest.approx(10 / 3, rel=1e-3) and m.kappa == pytest.approx(10 / 3, rel=1e-3)
    assert m.out.rank_ratio == pytest.approx(3 / 8)
    p2 = unfolding_metrics(rank3_weight(8, 4, 3), "out", p=2)
    assert p2.kg == pytest.approx((1 + 0.36 + 0.09) / 8, abs=1e-3) and p2.kappa == pytest.approx(100 / 9, rel=1e-3)


def test_one_by_one_conv_with_more_outputs_normalizes_by_its_channels():
    """A 1x1 conv 12 -> 16: its out unfolding (16 x 12) is transposed for EVBMF; N is still 16."""
    m = unfolding_metrics(rank3_weight(16, 12, 1, noise=1e-8), "out")
    assert m.channels == 16 and m.rank == 3
    assert m.kg == pytest.approx(1.9 / 16, abs=1e-3)


def test_failed_factorization_gives_zeros():
    w = torch.randn(8, 4, 3, 3)
    w[0, 0, 0, 0] = float("nan")
    m = layer_metrics(w)
    assert m.kg == m.kappa == 0.0 and m.inp.rank == m.out.rank == 0


# ---------------------------------------------------------------------------------- unfold, low rank


def test_unfold_layout_and_fold_round_trip():
    w = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    out, inp = unfold(w, "out"), unfold(w, "in")
    assert out.shape == (2, 12) and inp.shape == (3, 8)
    assert out[1, 5] == w[1, 1, 0, 1].item()  # row: output channel; column: (in, kh, kw)
    assert inp[2, 5] == w[1, 2, 0, 1].item()  # row: input channel; column: (out, kh, kw)
    for mode in ("in", "out"):
        np.testing.assert_array_equal(fold(unfold(w, mode), w.shape, mode), w.numpy())
    with pytest.raises(ValueError):
        unfold(w, "sideways")


@pytest.mark.parametrize("L, M", [(30, 200), (200, 30)])
def test_low_rank_reconstruction_denoises(L, M):
    rng = np.random.default_rng(5)
    signal, y = low_rank_plus_noise(L, M, 4, 0.1, rng)
    res = evbmf(y, vectors=True)
    rec = res.reconstruct()
    assert rec.shape == y.shape and np.linalg.matrix_rank(rec) == 4
    assert np.linalg.norm(rec - signal) < 0.5 * np.linalg.norm(y - signal)
    np.testing.assert_allclose(np.linalg.svd(rec, compute_uv=False)[:4], res.d, rtol=1e-8)


def test_low_rank_of_a_conv_weight():
    w = rank3_weight(16, 8, 3, noise=1e-3)
    rebuilt, res = low_rank(torch.from_numpy(w), "out")
    assert rebuilt.shape == w.shape and res.rank == 3
    assert np.linalg.matrix_rank(unfold(rebuilt, "out"), tol=1e-8) == 3
    assert np.abs(rebuilt - w).max() < 0.05


def test_noise_estimate_is_scale_free_only_with_a_tight_tolerance():
    """The reference's absolute xatol (1e-5, scipy's default) resolves sigma2 only down to ~1e-5: small
    weights get a coarse noise estimate. With a tight tolerance sigma2 scales with the matrix squared."""
    rng = np.random.default_rng(7)
    _, y = low_rank_plus_noise(64, 576, 8, 1.0, rng)
    big, small = evbmf(y, xatol=1e-14, search="reference"), evbmf(1e-3 * y, xatol=1e-14, search="reference")
    assert big.rank == small.rank == 8
    assert small.sigma2 == pytest.approx(1e-6 * big.sigma2, rel=1e-6)
    np.testing.assert_allclose(small.d, 1e-3 * big.d, rtol=1e-6)


# ------------------------------------------------------------------------------------- noise search

# Matrices of known rank: (L, M, rank, signal spread in noise edges, noise sigma, seed) -> rank kept by
# the reference's bounded search as measured. The reference starts at the golden point of [lower, upper]
# and only shrinks that interval: with many signal components (half the rows) the objective has a second
# basin near the upper bound and Brent walks into it; with tiny weights (sigma2 << its absolute xatol of
# 1e-5) it stops before resolving sigma2 and keeps noise. The default (grid) search recovers every rank.
KNOWN_RANK = [
    ((64, 147, 32, (2, 4), 0.1, 1), 0),  # the ResNet stem's 64 x (3*7*7) unfolding: reference keeps nothing
    ((147, 64, 32, (2, 4), 0.1, 0), 3),  # the same shape transposed
    ((20, 50, 10, (2, 4), 0.1, 1), 4),
    ((64, 147, 0, (3, 6), 1e-4, 0), 8),  # pure noise of tiny weights: reference keeps noise
    ((64, 147, 32, (2, 40), 0.1, 0), 32),  # a spread spectrum
    ((64, 147, 8, (3, 6), 1e-4, 0), 8),
    ((64, 576, 32, (2, 4), 0.1, 0), 32),
    ((30, 300, 3, (3, 6), 0.1, 0), 3),
    ((64, 147, 0, (3, 6), 0.1, 0), 0),
]


def known_rank_matrix(L, M, r, spread, sigma, seed):
    return low_rank_plus_noise(L, M, r, sigma, np.random.default_rng(seed), spread)[1]


def objective_at(y, sigma2):
    """EVBMF's noise objective of y at sigma2 (the quantity both searches minimize)."""
    s = np.linalg.svd(y, compute_uv=False)
    L, M = sorted(y.shape)
    return noise_objective(sigma2, s**2, L, M, _xbar(L, M))


@pytest.mark.parametrize("case, reference_rank", KNOWN_RANK, ids=[f"{c[0]}x{c[1]}r{c[2]}" for c, _ in KNOWN_RANK])
def test_default_search_recovers_known_ranks_where_the_reference_may_not(case, reference_rank):
    """Why DEFAULT_SEARCH is "grid": it keeps the true rank of every case; the reference search fails on
    the first four (rank 0 on the 64 x 147 rank-32 stem unfolding)."""
    y = known_rank_matrix(*case)
    assert evbmf(y).rank == case[2]
    assert evbmf(y, search="grid").rank == case[2]
    assert evbmf(y, search="reference").rank == reference_rank


@pytest.mark.parametrize("case", [c for c, _ in KNOWN_RANK], ids=[f"{c[0]}x{c[1]}r{c[2]}" for c, _ in KNOWN_RANK])
def test_grid_search_never_ends_above_the_reference_or_the_dense_scan(case):
    y = known_rank_matrix(*case)
    grid, ref = evbmf(y, search="grid"), evbmf(y, search="reference")
    f_grid, f_ref = objective_at(y, grid.sigma2), objective_at(y, ref.sigma2)
    assert f_grid <= f_ref + 1e-9 * abs(f_ref)
    if grid.rank != ref.rank:  # a different basin: a clearly lower one
        assert f_grid < f_ref - 1.0
    L, M = sorted(y.shape)
    s2 = np.linalg.svd(y, compute_uv=False) ** 2
    dense = np.geomspace(grid.sigma2 * 1e-3, s2.sum() / (L * M), 4000)  # beyond the lower bound, to the upper
    assert f_grid <= noise_objective_grid(dense, s2, L, M, _xbar(L, M)).min() + 1e-9 * abs(f_grid)


def test_vectorized_objective_matches_the_scalar_one():
    y = known_rank_matrix(64, 147, 32, (2, 4), 0.1, 1)
    s2, xbar = np.linalg.svd(y, compute_uv=False) ** 2, _xbar(64, 147)
    sigma2s = np.geomspace(1e-4, 1.0, 9)
    want = [noise_objective(v, s2, 64, 147, xbar, residual=3.0) for v in sigma2s]
    np.testing.assert_allclose(noise_objective_grid(sigma2s, s2, 64, 147, xbar, residual=3.0), want, rtol=1e-12)
    short = s2[:40]  # H < L: the residual and (L - H) ln sigma2 terms
    want = [noise_objective(v, short, 64, 147, xbar, residual=3.0) for v in sigma2s]
    np.testing.assert_allclose(noise_objective_grid(sigma2s, short, 64, 147, xbar, residual=3.0), want, rtol=1e-12)


def test_grid_search_is_scale_free_at_the_default_tolerance():
    """The grid search refines ln(sigma2), so xatol is relative there: no tight tolerance needed."""
    y = known_rank_matrix(64, 576, 8, (3, 6), 1.0, 7)
    big, small = evbmf(y, search="grid"), evbmf(1e-3 * y, search="grid")
    assert big.rank == small.rank == 8
    assert small.sigma2 == pytest.approx(1e-6 * big.sigma2, rel=1e-4)
    ref_small = evbmf(1e-3 * y, search="reference")  # absolute xatol: sigma2 ~ 1e-6 is not resolved
    assert ref_small.sigma2 != pytest.approx(1e-6 * big.sigma2, rel=1e-2)


def test_search_option_is_threaded_and_checked():
    """The stem-shaped weight whose out unfolding is the 64 x 147 rank-32 case above."""
    w = known_rank_matrix(64, 147, 32, (2, 4), 0.1, 1).reshape(64, 3, 7, 7)
    assert unfolding_metrics(w, "out").rank == 32 and unfolding_metrics(w, "out", search="reference").rank == 0
    assert layer_metrics(w).out.rank == 32 and layer_metrics(w, search="reference").out.rank == 0
    assert low_rank(w)[1].rank == 32 and low_rank(w, search="reference")[1].rank == 0
    assert DEFAULT_SEARCH in SEARCHES
    with pytest.raises(ValueError, match="search"):
        evbmf(np.eye(3), search="golden")


def test_grid_search_with_a_zero_lower_bound():
    """An exactly rank-3 matrix: the trailing singular values are 0, so the lower bound is 0 (no log)."""
    y = np.zeros((8, 20))
    y[[0, 1, 2], [0, 1, 2]] = [10, 6, 3]
    grid, ref = evbmf(y, search="grid"), evbmf(y, search="reference")
    assert np.isfinite(grid.sigma2) and grid.sigma2 > 0
    assert grid.rank == ref.rank and grid.sigma2 == pytest.approx(ref.sigma2, rel=1e-4)
