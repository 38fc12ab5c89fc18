"""evaluation/frechet.py: the Frechet distance's math against scipy's matrix square root and closed forms."""
import numpy as np
import pytest
import scipy.linalg

from cm3jax.evaluation.frechet import feature_statistics, frechet_distance, frechet_distance_of_features


def _scipy_reference(mean1, cov1, mean2, cov2):
    """The formula as FID's reference code writes it: scipy's sqrtm of the (non-symmetric) product."""
    covmean = scipy.linalg.sqrtm(cov1 @ cov2).real
    return float(np.sum((mean1 - mean2) ** 2) + np.trace(cov1 + cov2 - 2 * covmean))


def test_a_set_is_at_distance_zero_from_itself():
    features = np.random.default_rng(0).normal(size=(500, 16))
    assert frechet_distance_of_features(features, features) == pytest.approx(0.0, abs=1e-8)


def test_gaussian_features_match_scipys_reference():
    rng = np.random.default_rng(1)
    mix1, mix2 = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    features1 = rng.normal(size=(2000, 8)) @ mix1 + 1.0
    features2 = rng.normal(size=(2000, 8)) @ mix2 - 0.5
    stats1, stats2 = feature_statistics(features1), feature_statistics(features2)
    assert frechet_distance(*stats1, *stats2) == pytest.approx(_scipy_reference(*stats1, *stats2), rel=1e-6)


def test_diagonal_covariances_give_the_closed_form():
    mean1, mean2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mean1 - mean2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mean1, np.diag(var1), mean2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)


def test_a_shifted_set_is_as_far_as_the_shift():
    features = np.random.default_rng(2).normal(size=(300, 4))
    assert frechet_distance_of_features(features, features + 3.0) == pytest.approx(4 * 9.0, rel=1e-9)


def test_mismatched_or_too_few_features_are_refused():
    with pytest.raises(ValueError, match="n >= 2"):
        feature_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
