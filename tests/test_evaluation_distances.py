"""Tests for shortcut_jax.evaluation.distances and shortcut_jax.evaluation.report."""

import csv
import json
import math

import numpy as np
import pytest

from shortcut_jax.evaluation.distances import (
    MIN_PROJECTIONS,
    frechet_distance,
    gaussian_stats,
    random_directions,
    sliced_wasserstein,
    sliced_wasserstein_floor,
)
from shortcut_jax.evaluation.report import plot_budget_curve, plot_metric_vs_training, write_budget_table

try:
    import scipy.linalg
    import scipy.stats

    HAVE_SCIPY = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_SCIPY = False


# ---------------------------------------------------------------- reference helpers


def _w_p_1d_replicated(a, b, p):
    """Exact 1-D W_p by replicating each sample lcm/len times, then matching sorted values."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    L = math.lcm(len(a), len(b))
    ra, rb = np.repeat(a, L // len(a)), np.repeat(b, L // len(b))
    return float(np.mean(np.abs(ra - rb) ** p) ** (1.0 / p))


def _random_psd(rng, d, rank=None):
    rank = d if rank is None else rank
    a = rng.standard_normal((d, rank))
    return a @ a.T / max(rank, 1)


def _tr_sqrt_product_eig(s1, s2):
    # eig(s1 s2) equals eig(s1^{1/2} s2 s1^{1/2}) (real, >= 0) for PSD inputs.
    ev = np.linalg.eigvals(s1 @ s2)
    return float(np.sqrt(np.clip(ev.real, 0.0, None)).sum())


# ---------------------------------------------------------------- sliced Wasserstein


@pytest.mark.parametrize("p", [1, 2, 3])
def test_sw_1d_equal_sizes_matches_sorted_formula(p):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(300), 0.5 + 2.0 * rng.standard_normal(300)
    direct = np.mean(np.abs(np.sort(a) - np.sort(b)) ** p) ** (1.0 / p)
    assert sliced_wasserstein(a, b, p=p) == pytest.approx(direct, rel=1e-12)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_sw_1d_unequal_sizes_matches_exact(p):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(60), rng.exponential(size=45)
    got = sliced_wasserstein(a[:, None], b[:, None], p=p)
    assert got == pytest.approx(_w_p_1d_replicated(a, b, p), rel=1e-10)
    if p == 1 and HAVE_SCIPY:
        assert got == pytest.approx(scipy.stats.wasserstein_distance(a, b), rel=1e-10)


@pytest.mark.parametrize("sizes", [(80, 80), (60, 40), (37, 53)])
def test_sw_2d_matches_explicit_loop(sizes):
    n, m = sizes
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, 2))
    y = rng.standard_normal((m, 2)) @ np.array([[1.5, 0.3], [0.0, 0.5]]) + np.array([0.4, -0.2])
    p, k = 2, MIN_PROJECTIONS
    theta = random_directions(k, 2, seed=7)
    acc = 0.0
    for t in theta:
        acc += _w_p_1d_replicated(x @ t, y @ t, p) ** p
    expected = (acc / k) ** (1.0 / p)
    assert sliced_wasserstein(x, y, num_projections=k, seed=7, p=p) == pytest.approx(expected, rel=1e-10)


def test_random_directions_are_unit_and_spread():
    theta = random_directions(4096, 3, seed=0)
    np.testing.assert_allclose(np.linalg.norm(theta, axis=1), 1.0, atol=1e-12)
    # Uniform on the sphere: E[theta theta^T] = I / D.
    np.testing.assert_allclose(theta.T @ theta / len(theta), np.eye(3) / 3, atol=0.03)


def test_sw_identical_symmetric_and_deterministic():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((500, 4)), rng.standard_normal((400, 4)) + 0.3
    assert sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)
    # Same empirical measure with different sample counts: every point twice.
    assert sliced_wasserstein(x, np.repeat(x, 2, axis=0)) == pytest.approx(0.0, abs=1e-12)
    assert sliced_wasserstein(x, y) == pytest.approx(sliced_wasserstein(y, x), rel=1e-12)
    assert sliced_wasserstein(x, y, seed=5) == sliced_wasserstein(x, y, seed=5)
    assert sliced_wasserstein(x, y, seed=5) != sliced_wasserstein(x, y, seed=6)


@pytest.mark.parametrize("dim", [2, 5])
def test_sw_of_translated_copy(dim):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2000, dim))
    s = rng.standard_normal(dim)
    k = 512
    got = sliced_wasserstein(x, x + s, num_projections=k, seed=11)
    # Projection commutes with sorting for a translation, so every slice moves by theta.s exactly.
    theta = random_directions(k, dim, seed=11)
    assert got == pytest.approx(np.sqrt(np.mean((theta @ s) ** 2)), rel=1e-10)
    # E[(theta.u)^2] = 1/D, Var = 2(D-1) / (D^2 (D+2)) for unit u.
    var = 2 * (dim - 1) / (dim**2 * (dim + 2))
    tol = 5 * np.sqrt(var / k)
    assert abs(got**2 / (s @ s) - 1.0 / dim) < tol


def test_sw_grows_with_shift():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((1500, 3)), rng.standard_normal((1200, 3))
    direction = np.array([1.0, -2.0, 0.5])
    values = [sliced_wasserstein(x, y + a * direction) for a in (0.0, 0.1, 0.3, 1.0)]
    assert all(b > a for a, b in zip(values, values[1:]))


def test_sw_rejects_bad_arguments():
    x = np.zeros((10, 2))
    with pytest.raises(ValueError):
        sliced_wasserstein(x, np.zeros((10, 3)))
    with pytest.raises(ValueError):
        sliced_wasserstein(x, x, num_projections=MIN_PROJECTIONS - 1)
    with pytest.raises(ValueError):
        sliced_wasserstein(x, x, p=0.5)
    with pytest.raises(ValueError):
        sliced_wasserstein(x, np.full((10, 2), np.nan))


def test_sw_floor_uses_independent_draws_and_shrinks_with_n():
    calls = []

    def sample_fn(n, seed):
        calls.append(seed)
        return np.random.default_rng(seed).standard_normal((n, 2))

    mean_small, std_small = sliced_wasserstein_floor(sample_fn, 200, seeds=(0, 1, 2))
    assert sorted(calls) == [0, 1, 2, 3, 4, 5]
    assert mean_small > 0 and std_small > 0
    direct = np.mean([sliced_wasserstein(sample_fn(200, 2 * s), sample_fn(200, 2 * s + 1)) for s in (0, 1, 2)])
    assert mean_small == pytest.approx(direct, rel=1e-12)
    mean_large, _ = sliced_wasserstein_floor(sample_fn, 5000, seeds=(0, 1, 2))
    # The empirical SW between two same-distribution draws decays roughly like n^-1/2.
    assert mean_large < 0.5 * mean_small


# ---------------------------------------------------------------- Frechet distance


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(6)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    v1[:3] = 0.0  # singular directions are part of the closed form too
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("rank", [32, 10])
def test_frechet_identical_stats_and_pure_mean_shift(rank):
    rng = np.random.default_rng(7)
    d = 32
    mu, s = rng.standard_normal(d), _random_psd(rng, d, rank)
    scale = np.trace(s)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9 * scale)
    # Equal (possibly singular) covariances: only the mean term may remain.
    shift = rng.standard_normal(d)
    assert frechet_distance(mu, s, mu + shift, s) == pytest.approx(shift @ shift, abs=1e-8 * scale)


@pytest.mark.parametrize("ranks", [(24, 24), (24, 6), (3, 24), (5, 5)])
def test_frechet_symmetric_nonnegative_matches_eig_route(ranks):
    rng = np.random.default_rng(8 + sum(ranks))
    d = 24
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_psd(rng, d, ranks[0]), _random_psd(rng, d, ranks[1])
    fd12, fd21 = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert fd12 >= 0.0
    assert fd12 == pytest.approx(fd21, rel=1e-8)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * _tr_sqrt_product_eig(s1, s2)
    assert fd12 == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # Covariance-only part (same means) is non-negative on its own, not just thanks to the mean term.
    assert frechet_distance(mu1, s1, mu1, s2) >= 0.0
    cov_only = np.trace(s1) + np.trace(s2) - 2 * _tr_sqrt_product_eig(s1, s2)
    assert frechet_distance(mu1, s1, mu1, s2) == pytest.approx(cov_only, rel=1e-6, abs=1e-6)


def test_frechet_matches_reference_sqrtm_when_well_conditioned():
    rng = np.random.default_rng(9)
    d = 20
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1 = _random_psd(rng, d, 3 * d) + 0.5 * np.eye(d)
    s2 = _random_psd(rng, d, 3 * d) + 0.5 * np.eye(d)
    if HAVE_SCIPY:
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        tr_covmean = float(np.real(np.trace(covmean)))
    else:
        # Independent route: square root of s1 via eig (not eigh), then eig of the product.
        w, v = np.linalg.eig(s1)
        r1 = (v * np.sqrt(w.real)) @ np.linalg.inv(v)
        tr_covmean = float(np.sqrt(np.linalg.eigvals(r1 @ s2 @ r1).real).sum())
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_tolerates_asymmetric_rounding_and_rejects_bad_input():
    rng = np.random.default_rng(10)
    d = 12
    mu, s1, s2 = rng.standard_normal(d), _random_psd(rng, d), _random_psd(rng, d)
    noisy = s1 + 1e-13 * rng.standard_normal((d, d))
    assert frechet_distance(mu, noisy, mu, s2) == pytest.approx(frechet_distance(mu, s1, mu, s2), rel=1e-8)
    with pytest.raises(ValueError):
        frechet_distance(mu, s1, mu[:-1], s2[:-1, :-1])
    with pytest.raises(ValueError):
        frechet_distance(mu, s1, mu, np.full((d, d), np.nan))


def test_gaussian_stats_float64_and_recovers_moments():
    rng = np.random.default_rng(11)
    d = 6
    mu_true = rng.standard_normal(d)
    chol = np.tril(rng.standard_normal((d, d))) + 2 * np.eye(d)
    feats = (rng.standard_normal((20000, d)) @ chol.T + mu_true).astype(np.float32)
    mu, sigma = gaussian_stats(feats)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    assert sigma.shape == (d, d)
    np.testing.assert_allclose(sigma, sigma.T)
    np.testing.assert_allclose(mu, mu_true, atol=0.1)
    np.testing.assert_allclose(sigma, chol @ chol.T, atol=0.1 * np.abs(chol @ chol.T).max())
    # D == 1 keeps a [1, 1] covariance so it composes with frechet_distance.
    mu1, s1 = gaussian_stats(feats[:, :1])
    assert mu1.shape == (1,) and s1.shape == (1, 1)
    # Same-distribution feature sets give a distance close to 0 relative to a shifted set.
    a, b = gaussian_stats(feats[:10000]), gaussian_stats(feats[10000:])
    c = gaussian_stats(feats[10000:] + 1.0)
    assert frechet_distance(*a, *b) < 0.05 * frechet_distance(*a, *c)


# ---------------------------------------------------------------- report


def test_write_budget_table_scalar_with_floor(tmp_path):
    results = {1: 0.5, 2: 0.25, 4: 0.125, 128: 0.0625}
    md = write_budget_table(
        results, tmp_path / "sub" / "sw", metric_name="sw2", floor=0.05, extra_columns={"nfe": {1: 1, 2: 2, 4: 4}}
    )
    for ext in ("md", "json", "csv"):
        assert (tmp_path / "sub" / f"sw.{ext}").stat().st_size > 0
    assert (tmp_path / "sub" / "sw.md").read_text() == md
    header = md.splitlines()[0]
    assert header == "| steps | sw2 | ratio to floor | nfe |"
    assert "| 1 | 0.5 | 10x | 1 |" in md
    assert "| 128 | 0.0625 | 1.25x |  |" in md

    payload = json.loads((tmp_path / "sub" / "sw.json").read_text())
    assert payload["metric_name"] == "sw2" and payload["floor"] == 0.05
    assert [r["steps"] for r in payload["rows"]] == [1, 2, 4, 128]
    assert [r["sw2"] for r in payload["rows"]] == [0.5, 0.25, 0.125, 0.0625]
    assert payload["rows"][0]["ratio_to_floor"] == pytest.approx(10.0)
    assert payload["rows"][-1]["nfe"] is None

    with open(tmp_path / "sub" / "sw.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["steps"]) for r in rows] == [1, 2, 4, 128]
    assert [float(r["sw2"]) for r in rows] == [0.5, 0.25, 0.125, 0.0625]


def test_write_budget_table_mean_std_dicts(tmp_path):
    results = {"8": {"mean": 0.123456789, "std": 0.01, "n_seeds": 3}, "2": {"mean": 0.4, "std": 0.02, "n_seeds": 3}}
    md = write_budget_table(results, tmp_path / "fd", metric_name="fd")
    lines = md.splitlines()
    assert lines[0] == "| steps | fd | fd n_seeds |"
    assert lines[2] == "| 2 | 0.4 ± 0.02 | 3 |"
    assert lines[3] == "| 8 | 0.1235 ± 0.01 | 3 |"
    payload = json.loads((tmp_path / "fd.json").read_text())
    assert payload["floor"] is None
    assert payload["rows"][1] == {"steps": 8, "fd_mean": 0.123456789, "fd_std": 0.01, "fd_n_seeds": 3.0}
    with open(tmp_path / "fd.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # Full precision survives in the CSV even though the markdown rounds.
    assert float(rows[1]["fd_mean"]) == 0.123456789
    with pytest.raises(ValueError):
        write_budget_table({1: {"std": 0.1}}, tmp_path / "bad", metric_name="fd")


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(tmp_path):
    budgets = [1, 2, 4, 8, 16, 32, 64, 128]
    curves = {
        "shortcut": {b: 0.05 + 0.5 / b for b in budgets},
        "flow matching": {b: 0.05 + 2.0 / b for b in budgets},
    }
    stds = {"shortcut": {b: 0.01 for b in budgets}}
    out = plot_budget_curve(
        curves, tmp_path / "plots" / "budget.png", metric_name="sw2", floor=0.04, title="t", stds=stds
    )
    assert out == str(tmp_path / "plots" / "budget.png")
    assert _is_png(out) and (tmp_path / "plots" / "budget.png").stat().st_size > 1000

    dict_curves = {"shortcut": {b: {"mean": 0.1 / b, "std": 0.01} for b in budgets}}
    out2 = plot_budget_curve(dict_curves, tmp_path / "budget_dict.png", metric_name="sw2", log_y=True)
    assert _is_png(out2)

    training = {"1 step": {0: 1.0, 1000: 0.5, 2000: 0.3}, "128 steps": {0: 0.8, 1000: 0.2, 2000: 0.1}}
    out3 = plot_metric_vs_training(training, tmp_path / "train.png", metric_name="sw2")
    assert _is_png(out3) and (tmp_path / "train.png").stat().st_size > 1000
