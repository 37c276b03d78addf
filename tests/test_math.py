"""The math of the model checked against closed forms and independent computations."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from helpers import make_vae, posterior_params
from scipy.special import expit
from scipy.stats import multivariate_normal

from keras_vae import (
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    GaussianLikelihood,
    Sampling,
)
from keras_vae.export import SCORE_SAMPLES, SCORE_SEED, score_epsilon
from keras_vae.likelihoods import LogitBernoulli

tfd = tfp.distributions


def kl_formula(mu, log_var):
    """½ Σ_j (σ_j² + μ_j² − 1 − log σ_j²), in float64."""
    mu, log_var = np.float64(mu), np.float64(log_var)
    return 0.5 * np.sum(np.exp(log_var) + mu**2 - 1.0 - log_var, axis=-1)


def test_closed_form_kl_matches_formula_tfp_and_monte_carlo(rng):
    model = make_vae((6,), latent_dim=3, hidden_units=(8,), likelihood="gaussian", seed=1)
    x = rng.normal(size=(5, 6)).astype("float32")
    mu, log_var = (t.numpy() for t in posterior_params(model, x))
    # The model's KL term (closed form by default) against the formula.
    kl_model = model.compute_terms(x, seed=3)["kl_loss"].numpy()
    np.testing.assert_allclose(kl_model, kl_formula(mu, log_var), rtol=1e-5, atol=1e-6)
    # Against TFP's KL for independently built distributions.
    q = tfd.Normal(mu.astype("float64"), np.exp(0.5 * log_var.astype("float64")))
    kl_tfp = tf.reduce_sum(tfd.kl_divergence(q, tfd.Normal(np.float64(0), np.float64(1))), -1)
    np.testing.assert_allclose(kl_model, kl_tfp, rtol=1e-5, atol=1e-6)
    # Against a Monte Carlo estimate E_q[log q(z) − log p(z)], within 4 standard errors.
    n = 200_000
    z = mu + np.exp(0.5 * log_var) * rng.normal(size=(n,) + mu.shape)
    log_q = -0.5 * np.sum((z - mu) ** 2 / np.exp(log_var) + log_var + np.log(2 * np.pi), -1)
    log_p = -0.5 * np.sum(z**2 + np.log(2 * np.pi), -1)
    diff = log_q - log_p
    se = diff.std(0) / np.sqrt(n)
    assert np.all(np.abs(diff.mean(0) - kl_model) < 4 * se + 1e-4)


def test_model_mc_kl_is_unbiased_for_closed_form(rng):
    model = make_vae(
        (6,),
        latent_dim=3,
        hidden_units=(8,),
        likelihood="gaussian",
        kl="mc",
        num_samples=20_000,
        seed=1,
    )
    x = rng.normal(size=(4, 6)).astype("float32")
    mu, log_var = (t.numpy() for t in posterior_params(model, x))
    kl_mc = model.compute_terms(x, seed=5)["kl_loss"].numpy()
    # Var[log q − log p] under q is ≤ a few nats² here; 20k draws give SE < 0.03.
    np.testing.assert_allclose(kl_mc, kl_formula(mu, log_var), atol=0.1)


@pytest.mark.parametrize("x_kind", ["binary", "gray"])
def test_bernoulli_neg_log_prob_is_summed_binary_cross_entropy(rng, x_kind):
    likelihood = BernoulliLikelihood()
    likelihood.build((4, 4, 1))
    logits = rng.normal(scale=3.0, size=(2, 3, 4, 4, 1)).astype("float32")  # [K, batch, ...]
    x = rng.uniform(size=(3, 4, 4, 1)).astype("float32")
    if x_kind == "binary":
        x = np.round(x)
    p = np.float64(expit(logits))
    bce = -(x * np.log(p) + (1 - x) * np.log1p(-p)).sum(axis=(2, 3, 4))
    nll = -likelihood.distribution(logits).log_prob(x).numpy()
    assert nll.shape == (2, 3)
    np.testing.assert_allclose(nll, bce, rtol=1e-5)


def test_bernoulli_is_stable_for_saturated_logits():
    likelihood = BernoulliLikelihood()
    likelihood.build((2,))
    logits = np.array([[80.0, -80.0]], "float32")
    nll = -likelihood.distribution(logits).log_prob(np.array([[0.0, 1.0]], "float32"))
    np.testing.assert_allclose(nll.numpy(), [160.0], rtol=1e-6)  # finite, = |ℓ| each


def test_bernoulli_gradient_and_other_methods_are_tfp_bernoulli(rng):
    # log p is computed as x·ℓ − softplus(ℓ): its gradient must be x − sigmoid(ℓ) and agree
    # with TFP's own Bernoulli; mean and sampling stay TFP's.
    likelihood = BernoulliLikelihood()
    likelihood.build((6,))
    logits = tf.constant(rng.normal(scale=4.0, size=(3, 6)).astype("float32"))
    x = np.round(rng.uniform(size=(3, 6))).astype("float32")
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        ours = likelihood.distribution(logits).log_prob(x)
        theirs = tfp.distributions.Independent(
            tfp.distributions.Bernoulli(logits=logits, dtype=tf.float32), 1
        ).log_prob(x)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        tape.gradient(ours, logits).numpy(), x - expit(logits.numpy()), atol=1e-6
    )
    np.testing.assert_allclose(
        tape.gradient(ours, logits).numpy(), tape.gradient(theirs, logits).numpy(), atol=1e-6
    )
    dist = likelihood.distribution(logits)
    assert isinstance(dist.distribution, LogitBernoulli)  # not TFP's own log_prob
    np.testing.assert_allclose(dist.mean().numpy(), expit(logits.numpy()), rtol=1e-6)
    draws = dist.sample(2000, seed=(1, 2)).numpy()
    assert set(np.unique(draws)) <= {0.0, 1.0}
    # 2000 draws: the standard error of each frequency is ≤ 0.011.
    np.testing.assert_allclose(draws.mean(axis=0), expit(logits.numpy()), atol=0.05)
    # Made from probabilities, it keeps TFP's formula: log p(x) = x log p + (1 − x) log(1 − p).
    p = expit(logits.numpy())
    from_probs = LogitBernoulli(probs=p, dtype=tf.float32).log_prob(x).numpy()
    np.testing.assert_allclose(from_probs, x * np.log(p) + (1 - x) * np.log1p(-p), rtol=1e-5)


@pytest.mark.parametrize("in_graph", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bernoulli_fused_log_prob_is_the_summed_log_likelihood(rng, in_graph, dtype):
    # 35 elements: two full groups of 16 and a padded one; logits up to ±80 saturate.
    likelihood = BernoulliLikelihood()
    likelihood.build((5, 7, 1))
    logits = rng.normal(scale=6.0, size=(4, 3, 5, 7, 1))
    logits[0, 0, :2, 0, 0] = [80.0, -80.0]
    logits = tf.cast(logits, dtype)
    x = rng.uniform(size=(3, 5, 7, 1)).astype("float32")
    x[1] = np.round(x[1])
    ell = np.float64(tf.cast(logits, "float32").numpy())
    expected = np.sum(x * ell - np.logaddexp(0, ell), axis=(2, 3, 4))  # x·ℓ − softplus ℓ
    call = tf.function(likelihood.fused_log_prob) if in_graph else likelihood.fused_log_prob
    fused = call(logits, x).numpy()
    assert fused.shape == (4, 3)
    np.testing.assert_allclose(fused, expected, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(fused, likelihood.log_prob(logits, x).numpy(), atol=1e-4)


# "xla": inside an XLA-compiled step, as under compile(jit_compile=True).
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_bernoulli_fused_log_prob_gradients_are_the_summed_log_likelihoods(rng, mode, dtype):
    # x [3, ...] broadcast to logits [4, 3, ...]: ∂/∂x sums over the 4 draws.
    likelihood = BernoulliLikelihood()
    likelihood.build((5, 7, 1))
    logits = tf.cast(rng.normal(scale=6.0, size=(4, 3, 5, 7, 1)), dtype)
    x = tf.constant(rng.uniform(size=(3, 5, 7, 1)).astype("float32"))
    weights = tf.constant(rng.normal(size=(4, 3)).astype("float32"))

    def gradients(log_prob):
        with tf.GradientTape() as tape:
            tape.watch([logits, x])
            total = tf.reduce_sum(weights * log_prob(logits, x))
        return tape.gradient(total, [logits, x])

    if mode != "eager":
        gradients = tf.function(gradients, jit_compile=mode == "xla")
    fused, reference = gradients(likelihood.fused_log_prob), gradients(likelihood.log_prob)
    ell = np.float64(tf.cast(logits, "float32").numpy())
    w = np.float64(weights.numpy())[..., None, None, None]
    expected_logits = w * (x.numpy() - 1 / (1 + np.exp(-ell)))  # x − sigmoid ℓ
    expected_x = np.sum(w * ell, axis=0)
    assert fused[0].dtype == logits.dtype and fused[1].shape == x.shape
    tolerance = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}[dtype]
    for got, want in [(fused[0], expected_logits), (fused[1], expected_x)]:
        got = tf.cast(got, "float32").numpy()
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
    for got, want in zip(fused, reference):
        np.testing.assert_allclose(
            tf.cast(got, "float32").numpy(),
            tf.cast(want, "float32").numpy(),
            rtol=tolerance,
            atol=tolerance,
        )


@pytest.mark.parametrize("learn_sigma", ["none", "shared", "per_pixel"])
def test_gaussian_neg_log_prob_matches_formula(rng, learn_sigma):
    shape = (3, 2)
    likelihood = GaussianLikelihood(sigma=0.3, learn_sigma=learn_sigma)
    likelihood.build(shape)
    if learn_sigma == "per_pixel":
        likelihood.log_sigma.assign(rng.normal(scale=0.5, size=shape).astype("float32"))
    sigma = np.float64(likelihood.scale().numpy()) * np.ones(shape)
    mu = rng.normal(size=(5,) + shape).astype("float32")
    x = rng.normal(size=(5,) + shape).astype("float32")
    d = np.prod(shape)
    if learn_sigma == "per_pixel":  # Σ_i [(x_i − μ_i)²/(2σ_i²) + ½ log(2πσ_i²)]
        expected = np.sum(
            (x - mu) ** 2 / (2 * sigma**2) + 0.5 * np.log(2 * np.pi * sigma**2), axis=(1, 2)
        )
    else:  # ‖x − μ‖²/(2σ²) + (D/2) log(2πσ²)
        s = sigma.flat[0]
        expected = np.sum((x - mu) ** 2, axis=(1, 2)) / (2 * s**2) + d / 2 * np.log(
            2 * np.pi * s**2
        )
    nll = -likelihood.distribution(mu).log_prob(x).numpy()
    np.testing.assert_allclose(nll, expected, rtol=1e-5)


def test_continuous_bernoulli_is_bernoulli_plus_log_normalizer(rng):
    likelihood = ContinuousBernoulliLikelihood()
    likelihood.build((5,))
    logits = rng.normal(scale=2.0, size=(4, 5))
    x = rng.uniform(size=(4, 5))
    lam = expit(logits)
    # C(λ) = 2 artanh(1 − 2λ) / (1 − 2λ)
    log_c = np.log(2 * np.arctanh(1 - 2 * lam) / (1 - 2 * lam))
    expected = np.sum(x * np.log(lam) + (1 - x) * np.log1p(-lam) + log_c, axis=-1)
    got = likelihood.distribution(logits.astype("float32")).log_prob(x.astype("float32"))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


def test_reparameterized_samples_have_posterior_moments_and_gradients():
    sampling = Sampling(seed=7)
    mu = tf.constant([[0.5, -2.0, 3.0]])
    log_var = tf.constant([[0.0, -1.0, 1.5]])
    k = 100_000
    z = sampling((mu, log_var), num_samples=k).numpy()
    assert z.shape == (k, 1, 3)
    var = np.exp(log_var.numpy())
    # mean within 4 standard errors; variance within 4 SEs (SE of s² ≈ σ² √(2/K))
    assert np.all(np.abs(z.mean(0) - mu.numpy()) < 4 * np.sqrt(var / k))
    assert np.all(np.abs(z.var(0) - var) < 4 * var * np.sqrt(2 / k))
    # z = μ + σ ε: ∂z/∂μ = 1 and ∂z/∂log σ² = ½ σ ε = ½ (z − μ), sample by sample.
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([mu, log_var])
        z = sampling((mu, log_var), seed=11)
        total = tf.reduce_sum(z)
    np.testing.assert_allclose(tape.gradient(total, mu).numpy(), np.ones((1, 3)))
    np.testing.assert_allclose(
        tape.gradient(total, log_var).numpy(), 0.5 * (z - mu).numpy(), rtol=1e-5
    )


def test_seeded_sampling_is_reproducible():
    mu, log_var = tf.zeros((2, 3)), tf.zeros((2, 3))
    a = Sampling(seed=3)((mu, log_var)).numpy()
    b = Sampling(seed=3)((mu, log_var)).numpy()
    c = Sampling()((mu, log_var), seed=4).numpy()
    d = Sampling()((mu, log_var), seed=4).numpy()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(c, d)
    assert not np.allclose(a, c)


# --------------------------------------------------------------------------- pPCA
D, LATENT, SIGMA = 5, 2, 0.5


def ppca(rng):
    """z ~ N(0, I), x|z ~ N(Wz + b, σ²I), W with orthogonal columns so that the exact
    posterior N(M⁻¹Wᵀ(x − b), σ²M⁻¹), M = WᵀW + σ²I, is diagonal."""
    q, _ = np.linalg.qr(rng.normal(size=(D, LATENT)))
    w = q * np.array([2.0, 0.7])
    b = rng.normal(size=D)
    return w, b


def ppca_vae(w, b, kl="analytic"):
    model = make_vae(
        (D,), latent_dim=LATENT, hidden_units=(), likelihood="gaussian", sigma=SIGMA, kl=kl, seed=0
    )
    m = w.T @ w + SIGMA**2 * np.eye(LATENT)
    m_inv = np.linalg.inv(m)
    model.decoder.layers[0].set_weights([w.T, b])  # x̂ = zWᵀ + b
    model.posterior.z_mean_head.set_weights([w @ m_inv, -(b @ w @ m_inv)])  # μ = M⁻¹Wᵀ(x − b)
    model.posterior.z_log_var_head.set_weights(
        [np.zeros((D, LATENT)), np.log(SIGMA**2 * np.diag(m_inv))]
    )
    return model


def ppca_data(rng, w, b, n):
    """n draws x = Wz + b + σ·noise of the pPCA model."""
    return rng.normal(size=(n, LATENT)) @ w.T + b + SIGMA * rng.normal(size=(n, D))


def move_encoder(model, rng):
    """Adds N(0, 0.3²) noise to the μ and log σ² heads: q moves away from p(z|x)."""
    for head in (model.posterior.z_mean_head, model.posterior.z_log_var_head):
        kernel, bias = head.get_weights()
        head.set_weights(
            [
                kernel + rng.normal(scale=0.3, size=kernel.shape),
                bias + rng.normal(scale=0.3, size=bias.shape),
            ]
        )


def ppca_log_px(x, w, b):
    return multivariate_normal(b, w @ w.T + SIGMA**2 * np.eye(D)).logpdf(x)


def test_ppca_elbo_equals_log_px_at_exact_posterior(rng):
    w, b = ppca(rng)
    x = ppca_data(rng, w, b, 50)
    exact = ppca_log_px(x, w, b)
    # At q = p(z|x), log p(x, z) − log q(z|x) = log p(x) for every z: with the Monte Carlo
    # KL even one draw gives log p(x) exactly.
    elbo = ppca_vae(w, b, kl="mc").elbo(x.astype("float32"), num_samples=1, seed=1).numpy()
    np.testing.assert_allclose(elbo, exact, atol=2e-4, rtol=1e-5)
    # With the closed-form KL the ELBO estimate is unbiased for log p(x): within 4 SEs.
    elbo_draws = np.stack(
        [
            ppca_vae(w, b).elbo(x.astype("float32"), num_samples=1000, seed=s).numpy()
            for s in range(8)
        ]
    )
    se = elbo_draws.std(0, ddof=1) / np.sqrt(8)
    assert np.all(np.abs(elbo_draws.mean(0) - exact) < 4 * se + 1e-4)


def test_ppca_elbo_is_below_log_px_for_other_encoders(rng):
    w, b = ppca(rng)
    x = ppca_data(rng, w, b, 20)
    exact = ppca_log_px(x, w, b)
    model = ppca_vae(w, b)
    for trial in range(3):
        move_encoder(model, rng)
        elbo = model.elbo(x.astype("float32"), num_samples=4000, seed=trial).numpy()
        # The gap KL(q ‖ p(z|x)) is positive; the 4000-sample estimate is far from it.
        assert np.all(elbo < exact), (elbo - exact).max()


@pytest.mark.parametrize("latent_dim", [LATENT, SCORE_SAMPLES // 2, SCORE_SAMPLES])
def test_served_score_draws_match_the_first_two_moments_of_n01(latent_dim):
    epsilon = score_epsilon(latent_dim).numpy()[:, 0, :].astype("float64")
    assert epsilon.shape == (SCORE_SAMPLES, latent_dim)
    np.testing.assert_allclose(epsilon.mean(0), 0.0, atol=1e-7)
    second_moment = epsilon.T @ epsilon / SCORE_SAMPLES
    if latent_dim <= SCORE_SAMPLES // 2:
        np.testing.assert_allclose(second_moment, np.eye(latent_dim), atol=1e-6)
    else:  # K/2 antithetic pairs span K/2 dimensions at most: the diagonal only
        np.testing.assert_allclose(np.diag(second_moment), 1.0, atol=1e-6)


def test_served_score_elbo_is_exact_for_a_linear_decoder(rng):
    # With x̂ = zWᵀ + b, E_q[log p(x|z)] depends on the draws only through their first two
    # moments: closed form −(‖x − μWᵀ − b‖² + Σ_j σ_j² ‖W_:j‖²)/(2σ²) − (D/2) log(2πσ²).
    w, b = ppca(rng)
    x = ppca_data(rng, w, b, 30).astype("float32")
    model = ppca_vae(w, b)
    move_encoder(model, rng)
    mu, log_var = (t.numpy().astype("float64") for t in posterior_params(model, x))
    expected_log_px_z = -(((x - mu @ w.T - b) ** 2).sum(1) + np.exp(log_var) @ (w**2).sum(0)) / (
        2 * SIGMA**2
    ) - D / 2 * np.log(2 * np.pi * SIGMA**2)
    kl = kl_formula(mu, log_var)
    served = model.score(x, SCORE_SAMPLES, epsilon=score_epsilon(LATENT))["elbo"].numpy()
    np.testing.assert_allclose(served, expected_log_px_z - kl, atol=2e-4, rtol=1e-5)
    # Plain normal draws of the same seed miss it by their second moment's error.
    plain = tf.random.stateless_normal((SCORE_SAMPLES, 1, LATENT), seed=SCORE_SEED)
    plain_error = model.score(x, SCORE_SAMPLES, epsilon=plain)["elbo"].numpy() - (
        expected_log_px_z - kl
    )
    assert np.abs(plain_error).mean() > 1e-2, np.abs(plain_error).mean()


def _gradient_draws(estimator, beta, x, weights, draws):
    """``draws`` independent estimates of the IWAE loss's gradient (K = 4) at ``weights``, each
    the mean over ``len(x)`` examples: (decoder-side, encoder-side) arrays [draws, n]."""
    model = make_vae(
        x.shape[1:],
        latent_dim=2,
        hidden_units=(8,),
        activation="tanh",
        objective="iwae",
        num_samples=4,
        beta=beta,
        seed=0,
        gradient_estimator=estimator,
    )
    model.set_weights(weights)
    model.compile(optimizer="sgd")
    encoder_ids = {id(v) for v in model._encoder_side_weights()}
    compute_gradients = tf.function(model.compute_gradients)  # traced once for all draws
    decoder, encoder = [], []
    for _ in range(draws):
        gradients, _ = compute_gradients(x)
        # One gradient per trainable weight, in that order (the optimizer's slots follow it).
        assert [g.shape for g in gradients] == [v.shape for v in model.trainable_weights]
        pairs = list(zip(gradients, model.trainable_weights))
        decoder.append(
            np.concatenate([g.numpy().ravel() for g, v in pairs if id(v) not in encoder_ids])
        )
        encoder.append(
            np.concatenate([g.numpy().ravel() for g, v in pairs if id(v) in encoder_ids])
        )
    return np.array(decoder), np.array(encoder)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_dreg_gradient_has_the_iwae_gradients_expectation(rng, beta):
    # The same weights and noise (seed 0) for both estimators: the decoder's gradient must be
    # identical; the encoder's must agree in expectation (the score term replaced by its
    # reparameterized form, with weights w̃(1 − β + β w̃)), within 4 standard errors of
    # the mean of 40 draws of 1000 examples each. (That DReG varies less is typical, not
    # guaranteed: at 1 of 8 random initializations of this small model it varied more.)
    x = np.tile(np.round(rng.uniform(size=(1, 6))), (1000, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    weights = make_vae((6,), latent_dim=2, hidden_units=(8,), activation="tanh").get_weights()
    decoder_r, encoder_r = _gradient_draws("reparam", beta, x, weights, 40)
    decoder_d, encoder_d = _gradient_draws("dreg", beta, x, weights, 40)
    np.testing.assert_allclose(decoder_d, decoder_r, rtol=1e-4, atol=1e-6)
    # Draw i of both estimators shares its noise: the standard error of the paired difference.
    difference = encoder_d.mean(axis=0) - encoder_r.mean(axis=0)
    standard_error = np.sqrt((encoder_d - encoder_r).var(axis=0) / len(encoder_d))
    assert np.all(np.abs(difference) <= 4 * standard_error + 1e-6), np.max(
        np.abs(difference) / standard_error
    )
