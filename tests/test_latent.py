"""Measures of the latent code against closed forms: KL per dimension, active units, the
mutual information of a linear-Gaussian model, and the linear probe."""

import json
import math

import numpy as np
import pytest
import tensorflow as tf
from helpers import make_vae, posterior_params
from scipy.special import logsumexp
from test_math import LATENT, SIGMA, D, ppca, ppca_data, ppca_vae

from keras_vae import latent
from keras_vae.evaluate import evaluate


def linear_encoder_model(kernel, bias, log_var):
    """A Gaussian-likelihood VAE whose q_φ(z|x) has μ = x·kernel + bias and log σ² =
    ``log_var`` (the encoder passes x through unchanged)."""
    data_dim, latent_dim = kernel.shape
    model = make_vae(
        (data_dim,), latent_dim=latent_dim, hidden_units=(), likelihood="gaussian", seed=0
    )
    model.posterior.z_mean_head.set_weights([kernel, bias])
    model.posterior.z_log_var_head.set_weights([np.zeros_like(kernel), log_var])
    return model


def test_kl_per_dimension_is_the_mean_closed_form_kl_of_each_factor(rng):
    model = make_vae((6,), latent_dim=3, hidden_units=(8,), likelihood="gaussian", seed=1)
    x = rng.normal(size=(30, 6)).astype("float32")
    mu, log_var = (np.float64(t) for t in posterior_params(model, x))
    expected = np.mean(0.5 * (np.exp(log_var) + mu**2 - 1 - log_var), axis=0)
    report = latent.latent_report(model, x, batch_size=7)
    np.testing.assert_allclose(report["kl_per_dimension"], expected, rtol=1e-5, atol=1e-7)
    # The factors add up to the model's total KL term, averaged over examples.
    total = model.compute_terms(x, seed=0)["kl_loss"].numpy().mean()
    np.testing.assert_allclose(sum(report["kl_per_dimension"]), total, rtol=1e-5)


@pytest.mark.parametrize("pieces", [{"prior": "mixture"}, {"posterior": "iaf"}])
def test_kl_per_dimension_is_none_without_factors(rng, pieces):
    # A mixture prior and an IAF posterior do not factorize over the dimensions.
    model = make_vae((6,), latent_dim=3, hidden_units=(8,), likelihood="gaussian", seed=1, **pieces)
    report = latent.latent_report(model, rng.normal(size=(10, 6)).astype("float32"))
    assert report["kl_per_dimension"] is None
    assert report["active_units"] == 3  # the other measures do not need the factors


def test_active_units_count_the_dimensions_whose_mean_varies_over_x(rng):
    # x standardized so that each column has variance exactly 1 over the examples: the
    # activity of z_j = s_j · x_j is s_j², on both sides of the threshold 0.01, or 0 for a
    # dimension whose mean ignores x.
    x = rng.normal(size=(200, 4))
    x = ((x - x.mean(0)) / x.std(0)).astype("float32")
    activity = np.array([0.0, 0.004, 0.02, 1.5])
    kernel = np.diag(np.sqrt(activity)).astype("float32")
    model = linear_encoder_model(kernel, np.array([3.0, -1, 0, 2], "float32"), np.zeros(4))
    report = latent.latent_report(model, x, batch_size=64)
    np.testing.assert_allclose(report["activity"], activity, rtol=1e-5, atol=1e-9)
    assert report["active_unit_threshold"] == 0.01
    assert report["active_units"] == 2


def test_mutual_information_of_a_linear_gaussian_model_is_its_closed_form():
    # pPCA with its exact posterior q(z|x) = N(A(x − b), S), S diagonal: the aggregate
    # posterior is the prior N(0, I), so I(x; z) = E[log q(z|x) − log p(z)] = −½ Σ_j log S_j.
    rng = np.random.default_rng(5)
    w, b = ppca(rng)
    x = ppca_data(rng, w, b, 2000).astype("float32")
    model = ppca_vae(w, b)
    s = SIGMA**2 / (np.sum(w**2, axis=0) + SIGMA**2)
    exact = -0.5 * np.sum(np.log(s))
    params = latent.encode_all(model, x, 500)
    mi = latent.mutual_information(model, params, seed=0)
    assert mi["num_examples"] == 2000 and mi["upper_bound"] == pytest.approx(math.log(2000))
    # Over fresh data sets of 2000 examples the estimate's standard deviation is 0.025.
    assert mi["value"] == pytest.approx(exact, abs=0.1), (mi, exact)


def test_mutual_information_is_zero_for_a_collapsed_and_log_n_for_a_sharp_posterior(rng):
    x = rng.normal(size=(300, 3)).astype("float32")
    kernel = rng.normal(size=(3, 2)).astype("float32")
    # q(z|x) the same for every x: each log q(z_n|x_m) is the same, so Î = 0 exactly.
    collapsed = linear_encoder_model(0 * kernel, np.ones(2, "float32"), np.zeros(2))
    mi = latent.mutual_information(collapsed, latent.encode_all(collapsed, x), seed=1)
    assert mi["value"] == pytest.approx(0.0, abs=1e-6)
    # Posteriors too narrow to overlap: q(z_n) = q(z_n|x_n) / N, so Î = log N, the bound.
    sharp = linear_encoder_model(kernel * 100, np.zeros(2, "float32"), np.full(2, -20.0))
    mi = latent.mutual_information(sharp, latent.encode_all(sharp, x), seed=1)
    assert mi["value"] == pytest.approx(math.log(300), abs=1e-6)


def test_mutual_information_of_a_flow_posterior_is_its_formula(rng):
    # An IAF posterior, whose distribution of N examples the estimate evaluates at once.
    model = make_vae(
        (6,), latent_dim=3, hidden_units=(8,), likelihood="gaussian", seed=1, posterior="iaf"
    )
    params = latent.encode_all(model, rng.normal(size=(12, 6)).astype("float32"))
    mi = latent.mutual_information(model, params, seed=4)
    tensors = {key: tf.constant(value) for key, value in params.items()}
    z = model.posterior.sample(tensors, 1, seed=4)[0]
    # Column m: log q_φ(z_n|x_m) for every n, from example m's distribution alone.
    log_q = np.float64(
        np.stack(
            [
                model.posterior.distribution({k: v[m : m + 1] for k, v in tensors.items()})
                .log_prob(z)
                .numpy()
                for m in range(12)
            ],
            axis=1,
        )
    )
    expected = np.mean(np.diag(log_q) - logsumexp(log_q, axis=1)) + math.log(12)
    assert mi["value"] == pytest.approx(expected, abs=1e-5)


def test_mutual_information_subset_and_blocks(monkeypatch):
    rng = np.random.default_rng(6)
    w, b = ppca(rng)
    model = ppca_vae(w, b)
    params = latent.encode_all(model, ppca_data(rng, w, b, 300).astype("float32"))
    whole = latent.mutual_information(model, params, seed=2)
    # The blocks of rows bound the memory, not the number.
    monkeypatch.setattr(latent, "MI_BLOCK_ELEMENTS", 7 * 300 * LATENT)
    assert latent.mutual_information(model, params, seed=2) == pytest.approx(whole, rel=1e-9)
    subset = latent.mutual_information(model, params, seed=2, num_examples=100)
    assert subset["num_examples"] == 100 and subset["upper_bound"] == pytest.approx(math.log(100))
    assert subset["value"] <= math.log(100)
    with pytest.raises(ValueError, match="num_examples must be >= 1; got 0"):
        latent.mutual_information(model, params, num_examples=0)


@pytest.fixture(scope="module")
def probe_case():
    """pPCA data split in train and test, with labels 1[z₁ > 0] of the latent that drew x."""
    rng = np.random.default_rng(7)
    w, b = ppca(rng)
    z = rng.normal(size=(700, LATENT))
    x = (z @ w.T + b + SIGMA * rng.normal(size=(700, D))).astype("float32")
    return ppca_vae(w, b), x[:500], (z[:500, 0] > 0).astype(int), x[500:], z[500:, 0] > 0


def test_probe_accuracy_is_a_logistic_regression_on_the_encoder_means(probe_case):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    model, x_train, y_train, x_test, y_test = probe_case
    report = latent.latent_report(model, x_test, y=y_test, x_train=x_train, y_train=y_train)
    # The same fit done here, on the means μ_φ(x) computed apart.
    mu_train, mu_test = (posterior_params(model, x)[0].numpy() for x in (x_train, x_test))
    scaler = StandardScaler().fit(mu_train)
    with threadpool_limits(1):
        probe = LogisticRegression(max_iter=1000).fit(scaler.transform(mu_train), y_train)
    assert report["probe_accuracy"] == probe.score(scaler.transform(mu_test), y_test)
    # z₁ is known from x up to the posterior's sd 0.24: the best rule errs only near 0
    # (accuracy 1 − arccos(0.97)/π = 0.92; binomial sd 0.019 over 200 test examples).
    assert report["probe_accuracy"] > 0.85
    # Labels unrelated to x: chance (binomial sd 0.035 over 200 test examples).
    noise = np.random.default_rng(0).integers(0, 2, size=700)
    report = latent.latent_report(
        model, x_test, y=noise[500:], x_train=x_train, y_train=noise[:500]
    )
    assert report["probe_accuracy"] < 0.65


def test_probe_needs_consistent_labels(probe_case):
    model, x_train, y_train, x_test, y_test = probe_case
    cases = [
        ({"y": y_test}, "needs y, x_train and y_train together; x_train, y_train missing"),
        ({"x_train": x_train, "y_train": y_train}, "together; y missing"),
        ({"y": y_test[:-1], "x_train": x_train, "y_train": y_train}, r"y has shape \(199,\)"),
        ({"y": y_test, "x_train": x_train, "y_train": y_train[:, None]}, "y_train has shape"),
        ({"y": y_test, "x_train": x_train[:0], "y_train": y_train[:0]}, "x_train has no"),
        (
            {"y": y_test, "x_train": x_train, "y_train": np.zeros(500)},
            r"needs 2 or more classes in y_train; got \[0.\]",
        ),
        (
            {"y": y_test, "x_train": x_train[:, :3], "y_train": y_train},
            r"expects inputs of shape \(batch,\) \+ \(5,\)",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            evaluate(model, x_test, 2, **kwargs)


def test_evaluate_reports_the_latent_section(probe_case):
    model, x_train, y_train, x_test, y_test = probe_case
    report, _ = evaluate(model, x_test, 5, y=y_test, x_train=x_train, y_train=y_train)
    measures = json.loads(json.dumps(report))["latent"]
    assert measures == latent.latent_report(model, x_test, 100, 0, y_test, x_train, y_train)
    assert measures["active_units"] == LATENT and measures["probe_accuracy"] > 0.85
    assert evaluate(model, x_test, 5)[0]["latent"]["probe_accuracy"] is None
