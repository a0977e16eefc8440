"""EVBMF and the low-rank metrics of a conv layer: knowledge gain and mapping condition (docs/method.md §4.4).

Weight distillation ranks same-architecture models layer by layer by how much "knowledge" each conv
weight holds. HistoKT's group measured it with Empirical Variational Bayes Matrix Factorization
(Nakajima et al., JMLR 2013; the AdaS code ``src/adas/VBMF.py`` and ``metrics.py``): EVBMF separates the
singular values of a weight unfolding into signal and noise without any tuning knob, and the retained,
shrunk singular values ``d`` give

* knowledge gain   G = (1/N) * sum_h d_h^p / d_1^p  (in [0, 1], p = 1), and
* mapping condition kappa = d_1^p / d_r^p           (lower = better conditioned),

per unfolding (input channels, output channels), averaged over the two for a layer.

The reference used scipy's ``minimize_scalar(method="Bounded")`` for the noise variance; scipy is not a
dependency here, so ``minimize_bounded`` is a port of that algorithm (Brent's bounded method, the same
defaults: ``xatol=1e-5`` absolute, 500 evaluations), which keeps the numbers the reference logged.

Noise search (``search``): the noise objective is multimodal when many components carry signal. Brent's
bounded search starts at the golden point of [lower, upper] and only ever shrinks that interval, so it
can settle in a local minimum: on a 64 x 147 unfolding (the ResNet stem's shape) with 32 clearly large
singular values it walks to the upper bound and keeps rank 0 (tests/distill/test_evbmf.py). Hence

* ``"reference"`` -- the reference's search, bit for bit: Brent on [lower, upper];
* ``"grid"``      -- the objective on ``GRID_POINTS`` log-spaced points of [lower, upper] (one vectorized
  evaluation), then Brent on ln(sigma2) between the best point's neighbours (there ``xatol`` is a
  tolerance on ln(sigma2), i.e. relative, so the estimate does not depend on the weights' scale); the
  best grid point is kept if Brent ends higher. It misses only a minimum narrower than the grid spacing.

``DEFAULT_SEARCH`` is ``"grid"``: it recovers the true rank of every known-rank test matrix, where the
reference search fails on some (the test that fixes the default names them).

Speed: singular values come from the eigenvalues of the short-side Gram matrix ``Y Y^T`` (float64),
about 10x faster than a full SVD on a 512 x 4608 unfolding; for the values EVBMF keeps (far above the
noise floor) the relative error is ~1e-15, and errors in the tiniest values only move constant terms of
the noise objective. ``low_rank`` reconstructs from the retained components as U_r diag(d/s) U_r^T Y.
"""

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Optional

import numpy as np

TAU_BAR = 2.5129  # Nakajima et al.: tau_bar = 2.5129 * sqrt(alpha), the EVBMF threshold constant
MODES = ("in", "out")
SEARCHES = ("grid", "reference")  # noise-variance search of evbmf(): see the module docstring
DEFAULT_SEARCH = "grid"
GRID_POINTS = 256  # log-spaced points of the grid search
_GOLDEN = 0.5 * (3.0 - math.sqrt(5.0))
_SQRT_EPS = math.sqrt(2.2e-16)  # scipy's fminbound uses this exact constant
_TINY = np.finfo(np.float64).tiny


# ------------------------------------------------------------------------------------------ minimizer


class Minimum(NamedTuple):
    x: float
    fun: float
    nfev: int
    converged: bool


def minimize_bounded(
    f: Callable[[float], float], lower: float, upper: float, xatol: float = 1e-5, maxiter: int = 500
) -> Minimum:
    """Minimize a scalar function on [lower, upper]: Brent's bounded method (golden section + parabolas).

    A port of scipy's ``minimize_scalar(method="Bounded")`` (fminbound), steps and stopping rule
    included, so EVBMF's noise estimate matches the reference implementation. The stopping tolerance
    is ``sqrt(eps)*|x| + xatol/3``: absolute, as scipy's.
    """
    if not lower <= upper:
        raise ValueError(f"lower bound {lower} exceeds upper bound {upper}")
    a, b = float(lower), float(upper)
    xf = nfc = fulc = a + _GOLDEN * (b - a)
    rat = e = 0.0
    fx = ffulc = fnfc = f(xf)
    num = 1
    xm = 0.5 * (a + b)
    tol1 = _SQRT_EPS * abs(xf) + xatol / 3.0
    tol2 = 2.0 * tol1
    while abs(xf - xm) > (tol2 - 0.5 * (b - a)):
        golden = True
        if abs(e) > tol1:  # try a parabola through the three best points
            golden = False
            r = (xf - nfc) * (fx - ffulc)
            q = (xf - fulc) * (fx - fnfc)
            p = (xf - fulc) * q - (xf - nfc) * r
            q = 2.0 * (q - r)
            if q > 0.0:
                p = -p
            q = abs(q)
            r, e = e, rat
            if abs(p) < abs(0.5 * q * r) and q * (a - xf) < p < q * (b - xf):
                rat = p / q
                x = xf + rat
                if (x - a) < tol2 or (b - x) < tol2:
                    rat = tol1 * (math.copysign(1.0, xm - xf) if xm != xf else 1.0)
            else:
                golden = True
        if golden:
            e = (a - xf) if xf >= xm else (b - xf)
            rat = _GOLDEN * e
        step = max(abs(rat), tol1)
        x = xf + (step if rat >= 0 else -step)
        fu = f(x)
        num += 1
        if fu <= fx:
            if x >= xf:
                a = xf
            else:
                b = xf
            fulc, ffulc = nfc, fnfc
            nfc, fnfc = xf, fx
            xf, fx = x, fu
        else:
            if x < xf:
                a = x
            else:
                b = x
            if fu <= fnfc or nfc == xf:
                fulc, ffulc = nfc, fnfc
                nfc, fnfc = x, fu
            elif fu <= ffulc or fulc in (xf, nfc):
                fulc, ffulc = x, fu
        xm = 0.5 * (a + b)
        tol1 = _SQRT_EPS * abs(xf) + xatol / 3.0
        tol2 = 2.0 * tol1
        if num >= maxiter:
            return Minimum(xf, float(fx), num, False)
    return Minimum(xf, float(fx), num, True)


# ---------------------------------------------------------------------------------------------- EVBMF


@dataclass
class EVBMF:
    """EVBMF of one matrix. ``d`` (shrunk) and ``s`` (all singular values) are in descending order;
    ``u`` (rows x rank) and ``vt`` (rank x cols), in the matrix's own orientation, only when asked for."""

    rank: int
    d: np.ndarray
    s: np.ndarray
    sigma2: float
    threshold: float
    u: Optional[np.ndarray] = field(default=None, repr=False)
    vt: Optional[np.ndarray] = field(default=None, repr=False)

    def reconstruct(self) -> np.ndarray:
        """The low-rank estimate U_r diag(d) V_r^T (all zeros when nothing is retained)."""
        if self.u is None:
            raise ValueError("EVBMF was computed without vectors; call evbmf(y, vectors=True)")
        return (self.u * self.d) @ self.vt


def _spectrum(y: np.ndarray, vectors: bool):
    """Singular values (descending) of a short-and-wide y, and its left singular vectors if asked.

    Eigen-decomposition of the L x L Gram matrix: the same values as an SVD, ~10x faster for conv
    unfoldings (L = channels, M = channels * k^2)."""
    gram = y @ y.T
    if vectors:
        lam, u = np.linalg.eigh(gram)
        return np.sqrt(np.clip(lam[::-1], 0.0, None)), u[:, ::-1]
    return np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None)), None


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    disc = np.clip((x - (1 + alpha)) ** 2 - 4 * alpha, 0.0, None)
    return 0.5 * (x - (1 + alpha) + np.sqrt(disc))


def noise_objective(sigma2: float, s2: np.ndarray, L: int, M: int, xbar: float, residual: float = 0.0) -> float:
    """EVBMF's free energy as a function of the noise variance (the reference's ``EVBsigma2``).

    ``x`` is floored at the smallest positive float: a zero singular value only adds a term that does
    not depend on sigma2 (-ln s^2), so flooring keeps the argmin and avoids an infinite objective.
    """
    alpha = L / M
    x = np.maximum(s2 / (M * sigma2), _TINY)
    big = x > xbar
    z1, z2 = x[big], x[~big]
    t = _tau(z1, alpha)
    value = (
        np.sum(z2 - np.log(z2)) + np.sum(z1 - t) + np.sum(np.log((t + 1) / z1)) + alpha * np.sum(np.log(t / alpha + 1))
    )
    return float(value + residual / (M * sigma2) + (L - s2.size) * math.log(sigma2))


def noise_objective_grid(
    sigma2s: np.ndarray, s2: np.ndarray, L: int, M: int, xbar: float, residual: float = 0.0
) -> np.ndarray:
    """``noise_objective`` at many noise variances at once (one row of x per variance)."""
    sigma2s = np.asarray(sigma2s, dtype=np.float64)
    alpha = L / M
    x = np.maximum(s2[None, :] / (M * sigma2s[:, None]), _TINY)
    xb = np.maximum(x, xbar)  # the large-x branch, only where it is used (tau of a small x has no log)
    t = _tau(xb, alpha)
    big = xb - t + np.log((t + 1) / xb) + alpha * np.log(t / alpha + 1)
    terms = np.where(x > xbar, big, x - np.log(x))
    return terms.sum(axis=1) + residual / (M * sigma2s) + (L - s2.size) * np.log(sigma2s)


def _noise_bounds(s2: np.ndarray, L: int, M: int, xbar: float) -> tuple[float, float]:
    """Search interval of sigma2 (docs/method.md §4.4 step 3; 0-based e_H as the reference computes it)."""
    alpha = L / M
    e = int(min(math.ceil(L / (1 + alpha)) - 1, L)) - 1
    upper = float(s2.sum() / (L * M))
    lower = float(max(s2[e + 1] / (M * xbar), s2[e + 1 :].mean() / M))
    return min(lower, upper), upper  # equal up to rounding for flat spectra: never an inverted interval


def search_noise(
    s2: np.ndarray, L: int, M: int, xbar: float, lower: float, upper: float, xatol: float, search: str
) -> Minimum:
    """The noise variance minimizing ``noise_objective`` on [lower, upper] by ``search`` (``SEARCHES``)."""

    def f(v):
        return noise_objective(v, s2, L, M, xbar)

    if search == "reference":
        return minimize_bounded(f, lower, upper, xatol)
    if search != "grid":
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    lo = max(lower, upper * 1e-15)  # a log grid needs lower > 0 (an exactly rank-deficient matrix)
    grid = np.geomspace(lo, upper, GRID_POINTS)
    i = int(np.argmin(noise_objective_grid(grid, s2, L, M, xbar)))
    a, b = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, GRID_POINTS - 1)])
    fine = minimize_bounded(lambda t: f(math.exp(t)), a, b, xatol)
    best = Minimum(float(grid[i]), f(float(grid[i])), fine.nfev + GRID_POINTS + 1, fine.converged)
    return Minimum(math.exp(fine.x), fine.fun, best.nfev, fine.converged) if fine.fun <= best.fun else best


def evbmf(
    y, sigma2: Optional[float] = None, vectors: bool = False, xatol: float = 1e-5, search: str = DEFAULT_SEARCH
) -> EVBMF:
    """EVBMF of a matrix (any orientation): retained rank, shrunk singular values, noise variance.

    ``sigma2`` given: use it (the reference's optional argument); else estimate it by minimizing
    ``noise_objective`` with ``search`` ("grid" or "reference", see the module docstring).
    ``vectors=True`` also returns the factors for ``reconstruct``.
    """
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2 or 0 in y.shape:
        raise ValueError(f"evbmf needs a non-empty matrix, got shape {y.shape}")
    transposed = y.shape[0] > y.shape[1]
    yy = y.T if transposed else y  # EVBMF is stated for L <= M
    L, M = yy.shape
    s, u = _spectrum(yy, vectors)
    alpha = L / M
    tau_bar = TAU_BAR * math.sqrt(alpha)
    xbar = (1 + tau_bar) * (1 + alpha / tau_bar)
    if sigma2 is None:
        lower, upper = _noise_bounds(s**2, L, M, xbar)
        if upper <= 0.0:  # the zero matrix: nothing to keep
            return _result(0, s, 0.0, 0.0, L, M, u, yy, transposed)
        sigma2 = search_noise(s**2, L, M, xbar, lower, upper, xatol, search).x
    threshold = math.sqrt(M * sigma2 * xbar)
    rank = int(np.sum(s > threshold))
    return _result(rank, s, float(sigma2), threshold, L, M, u, yy, transposed)


def _shrink(s: np.ndarray, sigma2: float, L: int, M: int) -> np.ndarray:
    """The EVB posterior singular values of the retained components (docs/method.md §4.4 step 5)."""
    c = 1 - (L + M) * sigma2 / s**2
    return (s / 2) * (c + np.sqrt(np.clip(c**2 - 4 * L * M * sigma2**2 / s**4, 0.0, None)))


def _result(rank, s, sigma2, threshold, L, M, u, yy, transposed) -> EVBMF:
    d = _shrink(s[:rank], sigma2, L, M)
    out = EVBMF(rank=rank, d=d, s=s, sigma2=sigma2, threshold=threshold)
    if u is not None:
        ur = u[:, :rank]
        vr = (yy.T @ ur) / s[:rank]  # right singular vectors of the retained components (s_h > 0)
        out.u, out.vt = (vr, ur.T) if transposed else (ur, vr.T)
    return out


# ----------------------------------------------------------------------------------------- unfoldings


def unfold(weight, mode: str) -> np.ndarray:
    """Unfolding of a 4-D conv weight (N_out, N_in, k, k) as float64.

    ``"in"`` (mode-3): N_in x (N_out*k*k); ``"out"`` (mode-4): N_out x (N_in*k*k), as AdaS's metrics.
    """
    w = _as_numpy(weight)
    if w.ndim != 4:
        raise ValueError(f"unfold needs a 4-D conv weight, got shape {w.shape}")
    if mode == "out":
        return w.reshape(w.shape[0], -1)
    if mode == "in":
        return w.transpose(1, 0, 2, 3).reshape(w.shape[1], -1)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def fold(matrix: np.ndarray, shape, mode: str) -> np.ndarray:
    """Inverse of ``unfold``: the 4-D weight of ``shape`` whose ``mode`` unfolding is ``matrix``."""
    n_out, n_in, kh, kw = shape
    if mode == "out":
        return matrix.reshape(shape)
    if mode == "in":
        return matrix.reshape(n_in, n_out, kh, kw).transpose(1, 0, 2, 3)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _as_numpy(weight) -> np.ndarray:
    """float64 numpy view of a tensor or array; the cast is numpy's: a torch op here would wake torch's
    OpenMP threads, which then compete with numpy's BLAS threads (measured 2-10x slower on 2 cores)."""
    if hasattr(weight, "detach"):  # a torch tensor: no torch import needed here
        weight = weight.detach().cpu()
        try:
            weight = weight.numpy()
        except TypeError:  # bfloat16 and friends have no numpy dtype
            weight = weight.float().numpy()
    return np.asarray(weight, dtype=np.float64)


# -------------------------------------------------------------------------------------------- metrics


def knowledge_gain(d, channels: int, p: int = 1) -> float:
    """G = (1/N) * sum_h (d_h / d_1)^p over the retained values (0 when none is retained)."""
    d = np.asarray(d, dtype=np.float64)
    if d.size == 0:
        return 0.0
    v = d**p
    return float(v.sum() / v.max() / channels)


def mapping_condition(d, p: int = 1) -> float:
    """kappa = d_1^p / d_r^p, largest over smallest retained value (0 when none is retained)."""
    d = np.asarray(d, dtype=np.float64)
    if d.size == 0:
        return 0.0
    v = d**p
    return float(v.max() / v.min())


@dataclass
class UnfoldingMetrics:
    mode: str
    channels: int
    rank: int
    rank_ratio: float
    kg: float
    kappa: float
    sigma2: float


@dataclass
class LayerMetrics:
    """Layer values as AdaS: G = (G_in + G_out)/2, kappa likewise averaged."""

    kg: float
    kappa: float
    inp: UnfoldingMetrics
    out: UnfoldingMetrics

    def to_dict(self) -> dict:
        return {"kg": self.kg, "kappa": self.kappa, "in": asdict(self.inp), "out": asdict(self.out)}


def unfolding_metrics(
    weight, mode: str, p: int = 1, xatol: float = 1e-5, search: str = DEFAULT_SEARCH
) -> UnfoldingMetrics:
    """Rank ratio, knowledge gain and mapping condition of one unfolding of a conv weight.

    The channel count N of the unfolded mode normalizes, also when EVBMF works on the transpose (a 1x1
    conv with more outputs than inputs). A factorization that fails (non-finite weights, LAPACK not
    converging) gives zeros, as the reference does when no earlier value exists.
    """
    y = unfold(weight, mode)
    channels = y.shape[0]
    if not np.isfinite(y).all():
        return UnfoldingMetrics(mode, channels, 0, 0.0, 0.0, 0.0, 0.0)
    try:
        r = evbmf(y, xatol=xatol, search=search)
    except np.linalg.LinAlgError:
        return UnfoldingMetrics(mode, channels, 0, 0.0, 0.0, 0.0, 0.0)
    return UnfoldingMetrics(
        mode, channels, r.rank, r.rank / channels, knowledge_gain(r.d, channels, p), mapping_condition(r.d, p), r.sigma2
    )


def layer_metrics(weight, p: int = 1, xatol: float = 1e-5, search: str = DEFAULT_SEARCH) -> LayerMetrics:
    """Knowledge gain and mapping condition of a conv layer from both unfoldings."""
    inp = unfolding_metrics(weight, "in", p, xatol, search)
    out = unfolding_metrics(weight, "out", p, xatol, search)
    return LayerMetrics((inp.kg + out.kg) / 2, (inp.kappa + out.kappa) / 2, inp, out)


def low_rank(weight, mode: str = "out", xatol: float = 1e-5, search: str = DEFAULT_SEARCH) -> tuple[np.ndarray, EVBMF]:
    """EVBMF low-rank reconstruction of a conv weight through one unfolding, folded back to 4-D (float64)."""
    w = _as_numpy(weight)
    r = evbmf(unfold(w, mode), vectors=True, xatol=xatol, search=search)
    return fold(r.reconstruct(), w.shape, mode), r
