"""Statistics, Frechet distance and precision/recall against straightforward float64 references."""

import warnings

import numpy as np
import pytest
import scipy.linalg

from diffusers_ext.eval.data import EvalInput
from diffusers_ext.eval.metrics import (
    FewSamplesWarning, FIDStatistics, compute_statistics, frechet_distance, precision_recall,
    spatial_frechet_distance,
)


def _features(n, d, seed, shift=0.0):
    """Correlated, non-isotropic features (N, D) like Inception activations (ReLU-ish, skewed)."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(123).standard_normal((d, d)) / np.sqrt(d)
    return np.abs(rng.standard_normal((n, d)) @ mix + shift).astype(np.float32)


def _reference_fid(x, y):
    """The textbook formula in float64 with scipy's sqrtm (as pytorch-fid / ADM), real part."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def test_statistics_match_numpy_cov():
    x = _features(300, 40, 0)
    mu, sigma = compute_statistics(x)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("n,d", [(600, 256), (300, 64)])
def test_frechet_distance_matches_sqrtm_reference(n, d):
    x, y = _features(n, d, 1), _features(n, d, 2, shift=0.3)
    ours = frechet_distance(FIDStatistics(*compute_statistics(x), num_samples=n),
                            FIDStatistics(*compute_statistics(y), num_samples=n))
    ref = _reference_fid(x, y)
    assert ref > 1.0
    assert ours == pytest.approx(ref, rel=1e-9)


def test_few_samples_warns_but_stays_real_and_accurate():
    x, y = _features(60, 128, 3), _features(70, 128, 4, shift=0.2)  # singular covariances
    a = FIDStatistics(*compute_statistics(x), num_samples=60)
    b = FIDStatistics(*compute_statistics(y), num_samples=70)
    with pytest.warns(FewSamplesWarning, match="60 samples"):
        ours = frechet_distance(a, b)
    assert isinstance(ours, float) and np.isfinite(ours)
    assert ours == pytest.approx(_reference_fid(x, y), rel=1e-6)


def test_set_against_itself_is_zero():
    x = _features(400, 128, 5)
    stats = FIDStatistics(*compute_statistics(x), num_samples=400)
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-8 * np.trace(stats.sigma))
    assert frechet_distance(stats, stats) >= 0.0


def test_sfid_uses_spatial_statistics_and_reports_missing():
    x, y, xs, ys = _features(200, 16, 6), _features(200, 16, 7), _features(200, 24, 8), _features(200, 24, 9, 0.5)
    a = FIDStatistics(*compute_statistics(x), *compute_statistics(xs), num_samples=200)
    b = FIDStatistics(*compute_statistics(y), *compute_statistics(ys), num_samples=200)
    assert spatial_frechet_distance(a, b) == pytest.approx(_reference_fid(xs, ys), rel=1e-9)
    assert spatial_frechet_distance(a, FIDStatistics(b.mu, b.sigma)) is None


def test_statistics_round_trip_with_adm_keys(tmp_path):
    x, xs = _features(50, 32, 10), _features(50, 20, 11)
    stats = FIDStatistics(*compute_statistics(x), *compute_statistics(xs), num_samples=50, network="net-id", pool=x)
    path = tmp_path / "ref.npz"
    stats.save(path)
    with np.load(path) as data:
        assert {"mu", "sigma", "mu_s", "sigma_s", "num_samples", "network", "pool"} <= set(data.files)
    back = EvalInput(path).stats
    for key in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
        np.testing.assert_array_equal(getattr(back, key), getattr(stats, key))
    assert back.num_samples == 50 and back.network == "net-id"
    # stored types: the sample count an int64, pool features float32 whatever they came in as
    FIDStatistics(stats.mu, stats.sigma, num_samples=50, pool=x.astype(np.float64)).save(tmp_path / "f64.npz")
    with np.load(tmp_path / "f64.npz") as data:
        assert data["num_samples"].dtype == np.int64 and data["pool"].dtype == np.float32
    # An ADM reference batch: only mu / sigma (no sample count); loads, and scores without warnings.
    np.savez(tmp_path / "adm.npz", mu=stats.mu, sigma=stats.sigma)
    adm = EvalInput(tmp_path / "adm.npz").stats
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert frechet_distance(adm, back) == pytest.approx(0.0, abs=1e-9)


def test_bad_statistics_give_clear_errors():
    with pytest.raises(ValueError, match="at least 2 samples"):
        compute_statistics(np.ones((1, 8)))
    with pytest.raises(ValueError, match="NaN"):
        compute_statistics(np.full((4, 3), np.nan))
    a = FIDStatistics(*compute_statistics(_features(10, 8, 0)))
    b = FIDStatistics(*compute_statistics(_features(10, 6, 0)))
    with pytest.raises(ValueError, match="different dimension"):
        frechet_distance(a, b)
    with pytest.raises(ValueError, match=r"mu must be \(D,\)"):
        FIDStatistics(np.zeros(3), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        FIDStatistics(np.zeros(2), np.array([[1.0, np.inf], [0.0, 1.0]]))


def _reference_pr(ref, sam, k=3):
    """Brute force: kth-nearest-neighbour balls (squared distances, self excluded), float64."""
    def d2(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(d2(ref, ref), axis=1)[:, k]
    r_sam = np.sort(d2(sam, sam), axis=1)[:, k]
    precision = (d2(sam, ref) <= r_ref[None, :]).any(1).mean()
    recall = (d2(ref, sam) <= r_sam[None, :]).any(1).mean()
    return precision, recall


def test_precision_recall_matches_brute_force():
    ref, sam = _features(150, 12, 12), _features(120, 12, 13, shift=0.6)
    p, r = precision_recall(ref, sam, batch=32)
    rp, rr = _reference_pr(ref, sam)
    assert (p, r) == pytest.approx((rp, rr), abs=1.5 / 120)  # at most one borderline point flips in float32
    assert 0.0 < p < 1.0 and 0.0 < r < 1.0
    assert precision_recall(ref, ref) == (1.0, 1.0)


def test_statistics_are_float64_and_malformed_ones_are_named():
    """float32 statistics (as some tools store them) are held in float64, so the distance is computed in
    float64; a malformed pair names itself."""
    stats = FIDStatistics(np.zeros(3, np.float32), np.eye(3, dtype=np.float32),
                          np.zeros(2, np.float32), np.eye(2, dtype=np.float32))
    assert {a.dtype for a in (stats.mu, stats.sigma, stats.mu_s, stats.sigma_s)} == {np.dtype(np.float64)}
    with pytest.raises(ValueError, match="mu/sigma"):
        FIDStatistics(np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="mu_s/sigma_s"):
        FIDStatistics(np.zeros(3), np.eye(3), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match="mu_s and sigma_s must be given together"):
        FIDStatistics(np.zeros(3), np.eye(3), np.zeros(2))


def test_few_samples_warning_starts_where_the_covariance_turns_singular():
    """N samples give a covariance of rank at most N - 1: singular already at N = D (warned), full rank from
    N = D + 1 (quiet)."""
    d = 8
    for n, singular in ((d, True), (d + 1, False)):
        x = _features(n, d, 12)
        assert (np.linalg.matrix_rank(compute_statistics(x)[1]) < d) == singular
        stats = FIDStatistics(*compute_statistics(x), num_samples=n)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            frechet_distance(stats, stats)
        assert any(issubclass(w.category, FewSamplesWarning) for w in caught) == singular, n


def test_statistics_of_two_samples_in_float64():
    """Two samples are enough for a covariance; float32 features are accumulated in float64 (float32 sums of
    values near 1e4 would be off in the 7th digit)."""
    two = compute_statistics(np.array([[1.0, 2.0], [2.0, 0.0]]))
    np.testing.assert_array_equal(two[0], [1.5, 1.0])
    np.testing.assert_allclose(two[1], [[0.5, -1.0], [-1.0, 2.0]], rtol=1e-15)
    x = (1e4 + np.random.default_rng(3).standard_normal((50, 3))).astype(np.float32)
    mu, sigma = compute_statistics(x)
    exact = x.astype(np.float64)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, exact.mean(0), rtol=1e-15)
    np.testing.assert_allclose(sigma, np.cov(exact.T), rtol=1e-9, atol=1e-12)


def test_statistics_on_disjoint_subspaces_give_a_finite_exact_distance():
    """Samples of a in dimensions 0-3 only, of b in 4-7 only, both rotated alike (both covariances singular,
    their product zero up to round-off): the square-root term vanishes and
    FID = |mu_a - mu_b|^2 + tr(sigma_a) + tr(sigma_b), finite
    (round-off eigenvalues below zero are clipped, not square-rooted)."""
    rng = np.random.default_rng(7)
    xa, xb = np.zeros((6, 8)), np.zeros((6, 8))
    xa[:, :4], xb[:, 4:] = rng.standard_normal((6, 4)), rng.standard_normal((6, 4)) + 1
    rotation = np.linalg.qr(rng.standard_normal((8, 8)))[0]   # the same rotation of both: no exact zeros left
    xa, xb = xa @ rotation, xb @ rotation
    (mu_a, s_a), (mu_b, s_b) = compute_statistics(xa), compute_statistics(xb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewSamplesWarning)
        got = frechet_distance(FIDStatistics(mu_a, s_a, num_samples=6), FIDStatistics(mu_b, s_b, num_samples=6))
    # the square root of round-off (1e-16) eigenvalues is 1e-8: that is the accuracy to expect here
    assert got == pytest.approx(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b), rel=1e-7)


def test_identical_samples_give_a_zero_covariance_and_a_plain_distance():
    """Every sample the same (sigma = 0, where even the pivoted Cholesky has rank 0): FID is
    |mu_a - mu_b|^2 + tr(sigma_b), the square-root term zero, nothing NaN."""
    a = np.tile(np.arange(5.0), (4, 1))
    b = np.random.default_rng(8).standard_normal((9, 5))
    (mu_a, s_a), (mu_b, s_b) = compute_statistics(a), compute_statistics(b)
    assert not s_a.any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewSamplesWarning)
        for x, y in (((mu_a, s_a), (mu_b, s_b)), ((mu_b, s_b), (mu_a, s_a))):
            got = frechet_distance(FIDStatistics(*x, num_samples=4), FIDStatistics(*y, num_samples=9))
            assert got == pytest.approx(((mu_a - mu_b) ** 2).sum() + np.trace(s_b), rel=1e-12)
