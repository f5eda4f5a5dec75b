"""Distribution distances used to score samples against reference data.

Everything here runs in NumPy float64 on the host: the metrics are evaluated on
a few thousand to tens of thousands of points per step budget, which is cheap
compared with sampling, and float64 keeps the small differences between step
budgets (and between a model and the data floor) well above rounding noise.

* :func:`sliced_wasserstein` -- sliced Wasserstein-p distance between two point
  clouds (used directly on low-dimensional toy data, or on features).
* :func:`sliced_wasserstein_floor` -- the data-against-data value of the same
  estimator, i.e. the distance a perfect sampler would still get at a given
  sample size.
* :func:`gaussian_stats` / :func:`frechet_distance` -- Frechet distance between
  Gaussian fits of two feature sets (the FID formula), computed through
  symmetric eigen-decompositions so that singular or nearly singular
  covariances (feature dimension 512-2048 with few samples) are handled.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = [
    "MIN_PROJECTIONS",
    "random_directions",
    "sliced_wasserstein",
    "sliced_wasserstein_floor",
    "gaussian_stats",
    "frechet_distance",
]

# Below a few hundred directions the Monte-Carlo error of the slicing becomes
# comparable to the gaps between step budgets we want to resolve.
MIN_PROJECTIONS = 256

# Upper bound on the number of float64 entries of one projected block, which
# keeps peak memory around a few tens of MB for 10^4-10^5 points.
_BLOCK_ELEMENTS = 1 << 22


def _as_point_cloud(a, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape [num_points, dim], got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    return arr


def random_directions(num_projections: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors drawn uniformly on the sphere S^{dim-1}, shape [num_projections, dim].

    These are exactly the directions :func:`sliced_wasserstein` uses for the same
    ``(num_projections, dim, seed)``, so external code can reproduce its slices.
    """
    if num_projections < 1 or dim < 1:
        raise ValueError("num_projections and dim must be positive")
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((num_projections, dim))
    return theta / np.linalg.norm(theta, axis=1, keepdims=True)


def _quantile_merge(n: int, m: int):
    """Pieces on which both empirical quantile functions are constant.

    The quantile function of n sorted points is the step function equal to the
    i-th point on ((i-1)/n, i/n]. Over the union of the two breakpoint sets both
    functions are piecewise constant, so integrating |Q_x - Q_y|^p over [0, 1]
    reduces to a weighted sum over at most n + m - 1 pieces -- exact, not a grid
    approximation.
    """
    # Equal rationals i/n == j/m round to the same double, so union1d merges them.
    t = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    t_prev = np.concatenate([[0.0], t[:-1]])
    weights = t - t_prev
    # Midpoints stay at least 1/(2nm) away from any breakpoint, so flooring is safe.
    mid = 0.5 * (t + t_prev)
    ix = np.minimum(np.floor(mid * n).astype(np.int64), n - 1)
    iy = np.minimum(np.floor(mid * m).astype(np.int64), m - 1)
    return ix, iy, weights


def _abs_pow(d: np.ndarray, p: float) -> np.ndarray:
    if p == 1:
        return np.abs(d)
    if p == 2:
        return d * d
    return np.abs(d) ** p


def sliced_wasserstein(x, y, *, num_projections: int = 512, seed: int = 0, p: float = 2) -> float:
    """Sliced Wasserstein-p distance between point clouds ``x`` [N, D] and ``y`` [M, D].

    ``SW_p(x, y) = ( mean_k W_p^p(<theta_k, x>, <theta_k, y>) )^(1/p)`` over
    ``num_projections`` random unit directions ``theta_k`` from
    :func:`random_directions` (seeded, so the same directions are used for every
    model / step budget compared under one ``seed``).

    Each 1-D term is the exact Wasserstein-p distance between the two projected
    empirical distributions (uniform weights):

    * ``N == M``: the optimal coupling matches sorted values, so
      ``W_p^p = mean_i |x_(i) - y_(i)|^p``.
    * ``N != M``: ``W_p^p = int_0^1 |Q_x(u) - Q_y(u)|^p du`` with Q the empirical
      quantile functions, evaluated on the common grid formed by the union of
      the breakpoints {i/N} and {j/M}. Both Q's are constant between consecutive
      grid points, so the integral is computed exactly.

    1-D inputs are treated as D = 1 (then every direction is +-1 and the result
    is the plain 1-D W_p). Computation is float64 and vectorised over
    projections in memory-bounded blocks.
    """
    x = _as_point_cloud(x, "x")
    y = _as_point_cloud(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: x has D={x.shape[1]}, y has D={y.shape[1]}")
    if int(num_projections) != num_projections or num_projections < MIN_PROJECTIONS:
        raise ValueError(f"num_projections must be an integer >= {MIN_PROJECTIONS}, got {num_projections}")
    p = float(p)
    if not (np.isfinite(p) and p >= 1):
        raise ValueError(f"p must be a finite number >= 1, got {p}")

    n, m = x.shape[0], y.shape[0]
    theta = random_directions(int(num_projections), x.shape[1], seed)
    merge = None if n == m else _quantile_merge(n, m)

    block = max(1, _BLOCK_ELEMENTS // (n + m))
    total = 0.0
    for start in range(0, theta.shape[0], block):
        th = theta[start : start + block]
        # [projections, points] so each sort runs over a contiguous row.
        px = np.sort(th @ x.T, axis=1)
        py = np.sort(th @ y.T, axis=1)
        if merge is None:
            total += _abs_pow(px - py, p).sum() / n
        else:
            ix, iy, w = merge
            total += (_abs_pow(px[:, ix] - py[:, iy], p) @ w).sum()
    return float((total / theta.shape[0]) ** (1.0 / p))


def sliced_wasserstein_floor(
    sample_fn: Callable[[int, int], np.ndarray],
    n: int,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    num_projections: int = 512,
    projection_seed: int = 0,
    p: float = 2,
    ddof: int = 0,
) -> tuple[float, float]:
    """Data-against-data sliced Wasserstein distance at sample size ``n``.

    With finitely many points even a perfect sampler scores a positive distance;
    this floor is the value to compare model scores against. For each ``s`` in
    ``seeds`` two independent data sets are drawn as ``sample_fn(n, 2*s)`` and
    ``sample_fn(n, 2*s + 1)`` (distinct seeds for distinct non-negative ``s``),
    and their distance is computed with the same estimator settings a model
    evaluation would use (``num_projections``, ``projection_seed``, ``p``).

    Returns ``(mean, std)`` over seeds; ``std`` uses ``ddof`` (population std by
    default, 0.0 for a single seed).
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must be non-empty")
    if min(seeds) < 0:
        raise ValueError("seeds must be non-negative")
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds must be distinct, otherwise draws are reused")
    values = []
    for s in seeds:
        a = sample_fn(n, 2 * s)
        b = sample_fn(n, 2 * s + 1)
        values.append(sliced_wasserstein(a, b, num_projections=num_projections, seed=projection_seed, p=p))
    values = np.asarray(values)
    std = float(values.std(ddof=ddof)) if len(values) > ddof else 0.0
    return float(values.mean()), std


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, float64) of ``features`` [N, D]."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim == 1:
        f = f[:, None]
    if f.ndim != 2:
        raise ValueError(f"features must have shape [num_samples, dim], got {f.shape}")
    if f.shape[0] < 2:
        raise ValueError("need at least two samples to estimate a covariance")
    if not np.all(np.isfinite(f)):
        raise ValueError("features contain non-finite values")
    mu = f.mean(axis=0)
    # atleast_2d because np.cov collapses the D == 1 case to a scalar.
    sigma = np.atleast_2d(np.cov(f, rowvar=False))
    return mu, sigma


def _check_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1:
        raise ValueError(f"mu{name} must be a vector, got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"sigma{name} must have shape {(mu.shape[0],) * 2}, got {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"mu{name}/sigma{name} contain non-finite values")
    # Accumulated covariances are symmetric only up to rounding; eigh would
    # silently read one triangle, so make the input it sees well defined.
    return mu, 0.5 * (sigma + sigma.T)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr( (s1^{1/2} s2 s1^{1/2})^{1/2} )``.

    The cross term is computed without a general matrix square root: ``s1^{1/2}``
    comes from ``eigh(s1)`` with negative eigenvalues clipped to 0, the symmetric
    PSD product ``s1^{1/2} s2 s1^{1/2}`` goes through ``eigvalsh``, its negative
    (rounding) eigenvalues are clipped to 0 and the square roots summed. Unlike
    ``scipy.linalg.sqrtm(s1 @ s2)`` this never produces complex parts or blows up
    on singular covariances (e.g. D = 2048 features with fewer than 2048 samples).
    Eigenvalues of the product that should be 0 come out at ~1e-16 * ||s||, which
    contribute ~1e-8 * sqrt(||s1|| ||s2||) each to the trace; that is the
    absolute accuracy to expect per near-null direction. The result is clipped
    at 0 so that identical statistics cannot return a tiny negative number.
    """
    mu1, s1 = _check_stats(mu1, sigma1, "1")
    mu2, s2 = _check_stats(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"dimension mismatch: {mu1.shape[0]} vs {mu2.shape[0]}")

    w1, v1 = np.linalg.eigh(s1)
    w1 = np.clip(w1, 0.0, None)
    # Eigenvalues below the rounding level of eigh are null directions: kept, each would add
    # ~1e-8 * ||s|| of noise to the cross term.
    keep = w1 > w1.max(initial=0.0) * w1.size * np.finfo(np.float64).eps
    # With b = V diag(sqrt(w)), s1^{1/2} = b V^T and b^T s2 b = V^T (s1^{1/2} s2 s1^{1/2}) V:
    # an orthogonal similarity, so same spectrum with one product fewer, and
    # dropping null directions of s1 removes their rounding noise outright.
    b = v1[:, keep] * np.sqrt(w1[keep])
    prod = b.T @ s2 @ b
    prod = 0.5 * (prod + prod.T)
    if prod.size:
        tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh(prod), 0.0, None)).sum())
    else:
        tr_sqrt = 0.0

    diff = mu1 - mu2
    value = float(diff @ diff) + float(w1.sum()) + float(np.trace(s2)) - 2.0 * tr_sqrt
    return max(value, 0.0)
