"""Hierarchical VAEs: a linear-Gaussian two-layer model against its closed-form marginal
log p(x), a one-layer hierarchy against the one-layer VAE, the per-layer KL terms, ancestral
sampling, free bits per layer, save/load and the served outputs."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_trains_saves_loads_and_serves, make_vae, user_networks
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm

from keras_vae import VAE
from keras_vae.evaluate import draw_noise, evaluate
from keras_vae.export import SCORE_SAMPLES, score_epsilon
from keras_vae.hierarchy import (
    GaussianLayer,
    HierarchicalPrior,
    LadderPosterior,
    TopDownPosterior,
)
from keras_vae.likelihoods import GaussianLikelihood
from keras_vae.posteriors import DiagonalGaussian
from keras_vae.priors import StandardNormal
from keras_vae.settings import ConfigError

# z_2 ~ N(0, 1), z_1 | z_2 ~ N(A z_2 + a, s1²), x | z_1 ~ N(W z_1 + b, σ² I), x ∈ R³.
A, a, S1, SIGMA = 1.5, 0.3, 0.6, 0.4
W, B = np.array([1.0, -0.5, 2.0]), np.array([0.2, 0.0, -0.1])


def marginal_log_px(x):
    """log p(x) = log N(x; W a + b, (A² + s1²) W Wᵀ + σ² I)."""
    cov = (A**2 + S1**2) * np.outer(W, W) + SIGMA**2 * np.eye(3)
    return multivariate_normal(W * a + B, cov).logpdf(x)


def set_dense(layer, kernel, bias=None):
    layer.kernel.assign(np.asarray(kernel, "float32"))
    if bias is not None:
        layer.bias.assign(np.asarray(bias, "float32"))


def linear_gaussian_model(q2_shift=0.0, posterior=TopDownPosterior, **settings):
    """The two-layer linear-Gaussian VAE with its exact posterior q(z_2|x) q(z_1|z_2, x)
    set by hand (q(z_2|x)'s mean shifted by ``q2_shift``), the top-down or the ladder
    ``posterior``, with the model ``settings``."""
    encoder = keras.Sequential([keras.Input((3,)), keras.layers.Identity()])
    decoder = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    model = VAE(
        encoder,
        decoder,
        likelihood=GaussianLikelihood(sigma=SIGMA),
        prior=HierarchicalPrior((1, 1), layer_hidden_units=()),
        posterior=posterior((1, 1), layer_hidden_units=(), seed=0),
        latent_dim=2,
        **settings,
    )
    set_dense(decoder.layers[-1], [W, np.zeros(3)], B)  # x reads z_1 only
    set_dense(model.prior.layers_below["0"].head, [[A, 0.0]], [a, np.log(S1**2)])
    # p(z_2|x): x | z_2 ~ N(W A z_2 + W a + b, C), C = s1² W Wᵀ + σ² I.
    c_inv = np.linalg.inv(S1**2 * np.outer(W, W) + SIGMA**2 * np.eye(3))
    p2 = 1 + A**2 * W @ c_inv @ W
    g = A * c_inv @ W / p2
    h = -g @ (W * a + B) + q2_shift
    q2 = model.posterior.estimates[1] if posterior is LadderPosterior else model.posterior.first
    set_dense(q2.head, np.stack([g, np.zeros(3)], 1), [h, -np.log(p2)])
    if posterior is LadderPosterior:
        # p(x|z_1) as a function of z_1 is N(z_1; Wᵀ(x − b)/WᵀW, σ²/WᵀW): the estimate
        # that the merge with p(z_1|z_2) turns into p(z_1|z_2, x).
        set_dense(
            model.posterior.estimates[0].head,
            np.stack([W / (W @ W), np.zeros(3)], 1),
            [-W @ B / (W @ W), np.log(SIGMA**2 / (W @ W))],
        )
        return model
    # p(z_1|z_2, x) ∝ N(z_1; A z_2 + a, s1²) N(x; W z_1 + b, σ² I).
    p1 = 1 / S1**2 + W @ W / SIGMA**2
    q1 = model.posterior.layers_after["0"]
    set_dense(
        q1.head, [[A / (S1**2 * p1), 0.0]], [(a / S1**2 - W @ B / SIGMA**2) / p1, -np.log(p1)]
    )
    set_dense(q1.context_dense, np.stack([W / (SIGMA**2 * p1), np.zeros(3)], 1))
    return model


def two_layer_vae(posterior, dtype="float32", **settings):
    """The VAE of 8×8 images with stochastic layers z_1 (3) and z_2 (2), the hierarchical
    prior and ``posterior``, the named families' networks; ``settings`` override."""
    defaults = {"hidden_units": (16,), "latent_dim": 5, "latent_layers": (3, 2)}
    return make_vae(
        (8, 8, 1), dtype, posterior=posterior, prior="hierarchical", **{**defaults, **settings}
    )


@pytest.fixture
def x3(rng):
    z2 = rng.normal(size=6)
    z1 = A * z2 + a + S1 * rng.normal(size=6)
    return (z1[:, None] * W + B + SIGMA * rng.normal(size=(6, 3))).astype("float32")


@pytest.mark.parametrize("posterior", [TopDownPosterior, LadderPosterior])
def test_with_the_exact_posterior_the_elbo_is_the_closed_form_log_px(posterior, x3):
    model = linear_gaussian_model(posterior=posterior)
    scores = model.score(x3, 16, seed=1)
    np.testing.assert_allclose(scores["elbo"].numpy(), marginal_log_px(x3), atol=2e-4)
    np.testing.assert_allclose(scores["log_px"].numpy(), marginal_log_px(x3), atol=2e-4)


def test_the_importance_weighted_estimate_converges_to_the_closed_form(x3):
    model = linear_gaussian_model(q2_shift=0.15)
    k = 20000
    log_px_z, log_pz, log_qz, _ = model.log_weights(x3, k, seed=2)
    log_w = (log_px_z + log_pz - log_qz).numpy().astype("float64")
    w = np.exp(log_w - log_w.max(0))
    estimate = np.log(w.mean(0)) + log_w.max(0)
    standard_error = w.std(0) / w.mean(0) / np.sqrt(k)  # of log p̂(x), by the delta method
    exact = marginal_log_px(x3)
    assert (np.abs(estimate - exact) < 4 * standard_error + 1e-4).all()
    assert (standard_error < 0.004).all()
    assert (model.score(x3, k, seed=2)["elbo"].numpy() < exact - 0.003).all()


def test_per_layer_kl_sums_to_the_kl_term_and_each_is_its_monte_carlo_estimate(x3):
    model = linear_gaussian_model(q2_shift=0.4)
    assert model.latent_layers == (1, 1)
    assert [t.name for t in model.metrics[-2:]] == ["kl_1", "kl_2"]
    epsilon = np.random.default_rng(3).normal(size=(500, 1, 2)).astype("float32")
    draws = model._draws(x3, None, 500, training=False, epsilon=epsilon)
    z = draws["z"].numpy()
    # Independently: log q(z_2|x) − log p(z_2) and log q(z_1|z_2, x) − log p(z_1|z_2).
    params = model.encode_params(x3)
    m2, v2 = params["z_mean"].numpy()[:, 0], np.exp(params["z_log_var"].numpy()[:, 0])
    kl_2 = (norm.logpdf(z[..., 1], m2, np.sqrt(v2)) - norm.logpdf(z[..., 1])).mean(0)
    p1 = 1 / S1**2 + W @ W / SIGMA**2
    m1 = ((A * z[..., 1] + a) / S1**2 + (x3 - B) @ W / SIGMA**2) / p1
    log_q1 = norm.logpdf(z[..., 0], m1, np.sqrt(1 / p1))
    kl_1 = (log_q1 - norm.logpdf(z[..., 0], A * z[..., 1] + a, S1)).mean(0)
    np.testing.assert_allclose(draws["layer_kl"].numpy(), [kl_1, kl_2], rtol=1e-4, atol=1e-4)
    terms = model.compute_terms(x3)
    np.testing.assert_allclose(terms["kl_1"] + terms["kl_2"], terms["kl_loss"], atol=1e-5)


def test_top_down_sampling_gives_the_prior_moments():
    model = linear_gaussian_model()
    z = model.sample_prior(40000, seed=4).numpy()
    # z_2 ~ N(0, 1); z_1 = A z_2 + a + s1 e: mean a, variance A² + s1², Cov(z_1, z_2) = A.
    se = 4 / np.sqrt(40000)
    np.testing.assert_allclose(z.mean(0), [a, 0.0], atol=se * np.sqrt(A**2 + S1**2))
    cov = np.cov(z.T)
    np.testing.assert_allclose(cov, [[A**2 + S1**2, A], [A, 1.0]], rtol=0.04)


def test_a_one_layer_hierarchy_is_the_one_layer_vae(rng):
    x = (rng.uniform(size=(5, 8, 8, 1)) > 0.5).astype("float32")
    flat = make_vae((8, 8, 1), latent_dim=3, hidden_units=(16,), seed=0, kl="mc")
    keras.utils.set_random_seed(0)
    deep = VAE(
        flat.encoder,
        flat.decoder,
        prior=HierarchicalPrior(),
        posterior=TopDownPosterior(seed=0),
        latent_dim=3,
    )
    assert deep.latent_layers == ()
    head = deep.posterior.first.head
    heads = flat.posterior.z_mean_head, flat.posterior.z_log_var_head
    set_dense(head, np.concatenate([h.kernel.numpy() for h in heads], 1))
    head.bias.assign(np.concatenate([h.bias.numpy() for h in heads]))
    epsilon = score_epsilon(3)
    for key in ("elbo", "log_px"):
        np.testing.assert_allclose(
            deep.score(x, SCORE_SAMPLES, epsilon=epsilon)[key].numpy(),
            flat.score(x, SCORE_SAMPLES, epsilon=epsilon)[key].numpy(),
            rtol=1e-5,
        )
    np.testing.assert_allclose(deep.reconstruct(x).numpy(), flat.reconstruct(x).numpy(), 1e-6)
    assert isinstance(flat.posterior, DiagonalGaussian)
    assert isinstance(flat.prior, StandardNormal)


def test_the_bottom_up_posterior_is_q_z1_given_x_times_q_z2_given_z1(rng):
    model = two_layer_vae("bottom_up", layer_hidden_units=())
    x = (rng.uniform(size=(4, 8, 8, 1)) > 0.5).astype("float32")
    params = model.encode_params(x)
    z, log_q = model.posterior.sample_and_log_prob(params, 7, seed=5)
    z = z.numpy()
    net = model.posterior.layers_after["1"].head
    out = z[..., :3] @ net.kernel.numpy() + net.bias.numpy()
    expected = log_normal(z[..., :3], params["z_mean"], params["z_log_var"]) + log_normal(
        z[..., 3:], out[..., :2], out[..., 2:]
    )
    np.testing.assert_allclose(log_q.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(
        model.posterior.distribution(params).log_prob(z).numpy(), expected, rtol=1e-5
    )


def log_normal(z, mean, log_var):
    return norm.logpdf(z, np.asarray(mean), np.exp(0.5 * np.asarray(log_var))).sum(-1)


def test_free_bits_floor_each_layer_and_leave_the_reported_elbo(x3):
    plain = linear_gaussian_model(q2_shift=0.4)
    terms = plain.compute_terms(x3, seed=0)
    floor = float(max(terms["kl_1"].numpy().mean(), terms["kl_2"].numpy().mean())) + 1
    floored = linear_gaussian_model(q2_shift=0.4, free_bits=floor)
    for model, kl_gradient in ((plain, True), (floored, False)):
        with tf.GradientTape() as tape:
            terms = model.compute_terms(x3, training=True, seed=0)
            loss = tf.reduce_mean(terms["loss"])
        # p(z_1|z_2)'s weights reach the loss through the KL term alone.
        gradients = tape.gradient(loss, model.prior.trainable_weights)
        assert any(g is not None and np.abs(g.numpy()).max() > 0 for g in gradients) == kl_gradient
    # Both layers (d_l = 1) under the floor λ: the loss's KL term is 2λ; the ELBO is the true one.
    np.testing.assert_allclose(terms["loss"], terms["reconstruction_loss"] + 2 * floor, rtol=1e-6)
    np.testing.assert_allclose(
        terms["elbo"].numpy(), plain.compute_terms(x3, seed=0)["elbo"].numpy(), rtol=1e-6
    )


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"latent_layers": (2, 2)}, "'latent_layers' must sum to latent_dim"),
        ({"latent_layers": (0, 3)}, "'latent_layers' must have sizes >= 1"),
        ({"layer_hidden_units": (0,)}, "'layer_hidden_units' must have widths >= 1"),
        ({"top_prior": "hierarchical"}, "'top_prior' must be one of"),
    ],
)
def test_bad_hierarchy_settings_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        make_vae((8, 8, 1), latent_dim=3, posterior="top_down", prior="hierarchical", **settings)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"posterior": "ladder"}, "'posterior' 'ladder' merges with the hierarchical prior"),
        ({"posterior": "diagonal_gaussian"}, "'latent_layers' are read by the hierarchical"),
    ],
)
def test_settings_a_hierarchy_would_not_read_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        make_vae((8, 8, 1), latent_dim=3, latent_layers=(2, 1), **settings)


def test_a_prior_and_posterior_must_share_their_layers():
    encoder, decoder = user_networks(latent_dim=3)
    with pytest.raises(ValueError, match=r"layers \[2, 1\] and the prior's \[1, 2\] differ"):
        VAE(
            encoder,
            decoder,
            prior=HierarchicalPrior((1, 2)),
            posterior=TopDownPosterior((2, 1)),
            latent_dim=3,
        )
    with pytest.raises(ValueError, match="it needs prior='hierarchical' over the same"):
        VAE(encoder, decoder, posterior=LadderPosterior((2, 1)), latent_dim=3)


def test_the_ladder_merge_stays_finite_for_extreme_variances(x3):
    model = linear_gaussian_model(posterior=LadderPosterior)
    head = model.posterior.estimates[0].head
    bias = head.bias.numpy()
    head.bias.assign([bias[0], -120.0])  # σ̂_1² = e⁻¹²⁰: q(z_1|z_2, x) is the estimate itself
    params = model.encode_params(x3)
    z_2 = tf.zeros((6, 1))
    mean, log_var = model.posterior._layer(0, z_2, params)
    np.testing.assert_allclose(mean.numpy(), params["z_mean_1"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(log_var.numpy(), -120.0, rtol=1e-6)


def test_a_vamp_prior_on_top_is_the_mixture_of_q_z_top_at_its_pseudo_inputs(rng):
    model = two_layer_vae("ladder", top_prior="vamp", num_components=4)
    z = rng.normal(size=(6, 5)).astype("float32")
    params = model.encode_params(model.prior.top.pseudo_inputs)  # q(z_2|u_k), k = 1..4
    components = log_normal(z[:, None, 3:], params["z_mean"][None], params["z_log_var"][None])
    log_p_top = model.prior.distribution(model._posterior_at).layer_log_probs(z)[1]
    np.testing.assert_allclose(log_p_top, logsumexp(components, axis=1) - np.log(4), rtol=1e-5)


def test_a_vamp_prior_on_top_needs_a_top_down_posterior():
    with pytest.raises(ValueError, match="needs a top-down posterior"):
        make_vae(
            (8, 8, 1),
            latent_dim=3,
            latent_layers=(2, 1),
            posterior="bottom_up",
            prior="hierarchical",
            top_prior="vamp",
        )


@pytest.mark.parametrize(
    "posterior, top_prior, gated",
    [("top_down", "mixture", True), ("bottom_up", "mixture", False), ("ladder", "vamp", True)],
)
def test_a_hierarchy_trains_saves_loads_and_serves_the_same_numbers(
    posterior, top_prior, gated, tmp_path, rng
):
    keras.utils.set_random_seed(0)
    model = two_layer_vae(
        posterior,
        layer_hidden_units=(8,),
        layer_gated=gated,
        top_prior=top_prior,
        num_components=3,
    )
    x = (rng.uniform(size=(64, 8, 8, 1)) > 0.5).astype("float32")
    assert model.prior.layer_gated == model.posterior.layer_gated == gated
    history = assert_trains_saves_loads_and_serves(model, x, tmp_path)
    assert {"kl_1", "kl_2"} <= set(history)


def test_a_gated_layer_multiplies_its_units_by_their_gates(rng):
    """(μ, log σ²) = H [a(W u + V h + b) ⊙ sigmoid(W' u + V' h + b')] + c, computed by hand."""
    layer = GaussianLayer(2, hidden_units=(3,), activation="tanh", gated=True)
    layer.build((None, 4), (None, 5))
    for weight in layer.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32"))
    u, h = rng.normal(size=(7, 6, 4)), rng.normal(size=(6, 5))
    hidden = layer.hidden[0]
    pre = u @ hidden.kernel.numpy() + hidden.bias.numpy() + h @ layer.context_dense.kernel.numpy()
    units = np.tanh(pre[..., :3]) / (1 + np.exp(-pre[..., 3:]))
    out = units @ layer.head.kernel.numpy() + layer.head.bias.numpy()
    mean, log_var = layer(u.astype("float32"), h.astype("float32"))
    np.testing.assert_allclose(mean, out[..., :2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(log_var, out[..., 2:], rtol=1e-5, atol=1e-5)
    config = layer.get_config()
    assert GaussianLayer.from_config(config).gated
    # A layer saved before gating existed has no "gated" key: it loads ungated.
    assert not GaussianLayer.from_config({k: v for k, v in config.items() if k != "gated"}).gated


def test_evaluate_reports_each_layers_kl_and_active_units(x3):
    model = linear_gaussian_model(q2_shift=0.15)
    report, scores = evaluate(model, x3, num_samples=300, chunk_size=128)
    # The same draws, scored directly.
    epsilon = draw_noise(0, tf.constant(0, tf.int64), 0, 300, 6, 2)
    *_, by_layer = model.log_weights(x3, epsilon=epsilon, by_layer=True)
    np.testing.assert_allclose(
        scores["kl_per_layer"], by_layer.numpy().mean(1), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(scores["kl_per_layer"].sum(0), scores["kl"], rtol=1e-5, atol=1e-5)
    assert [entry["mean"] for entry in report["kl_per_layer"]] == pytest.approx(
        list(scores["kl_per_layer"].mean(1))
    )
    # Both layers' means move with x; Var_x of the conditional means, computed independently.
    params = model.encode_params(x3)
    z = model.posterior.mean(params).numpy()
    activity = z.var(0)
    assert report["latent"]["active_units_per_layer"] == [int(a > 0.01) for a in activity]
    assert report["latent"]["active_units_per_layer"] == [1, 1]


def test_mixed_precision_computes_the_float32_hierarchys_log_weights():
    from keras_vae.data import load

    x = load("digits").x_test[:64]
    models = [
        two_layer_vae("ladder", hidden_units=(32,), layer_hidden_units=(16,), seed=0, dtype=dtype)
        for dtype in ("float32", "mixed_bfloat16")
    ]
    models[1].set_weights(models[0].get_weights())
    epsilon = np.random.default_rng(0).normal(size=(4, 64, 5)).astype("float32")
    full, mixed = (model.log_weights(x, epsilon=epsilon)[:3] for model in models)
    for a_, b_ in zip(full, mixed):
        assert b_.dtype == tf.float32
        # bfloat16 keeps 8 significant bits of the networks' activations.
        np.testing.assert_allclose(b_, a_, rtol=0.02, atol=0.3)
    assert not np.array_equal(mixed[0], full[0])  # it really ran in 16 bits


def test_an_autoregressive_decoder_reads_every_layer(rng):
    model = two_layer_vae(
        "ladder", architecture="made", hidden_units=(32,), layer_hidden_units=(16,)
    )
    x = (rng.uniform(size=(4, 8, 8, 1)) > 0.5).astype("float32")
    z = rng.normal(size=(4, 5)).astype("float32")
    z_top_moved = z.copy()
    z_top_moved[:, 3:] += 1.0
    # log p(x|z) depends on z_2 too: the decoder reads [z_1, z_2].
    assert not np.allclose(model.decode(z, x).log_prob(x), model.decode(z_top_moved, x).log_prob(x))
    scores = model.score(x, 50, seed=0)
    assert np.all(np.isfinite(scores["log_px"])) and np.all(scores["log_px"] >= scores["elbo"] - 1)
    assert model.sample(3, seed=1).shape == (3, 8, 8, 1)


def test_a_conditional_top_prior_draws_each_rows_z_from_its_label(rng):
    model = make_vae(
        (8, 8, 1),
        hidden_units=(16,),
        latent_dim=3,
        latent_layers=(2, 1),
        layer_hidden_units=(8,),
        posterior="top_down",
        prior="hierarchical",
        top_prior="conditional_gaussian",
        conditional=True,
        num_classes=3,
    )
    top = model.prior.top
    top.bias.assign([5.0, 0.0])  # p(z_2|y) = N(5, 1) for every class …
    top.kernel.assign([[0.0, 0.0], [-10.0, 0.0], [0.0, 0.0]])  # … but N(−5, 1) for class 1
    labels = np.array([0, 1, 2, 1])
    z = model.sample_prior(4, seed=1, labels=labels).numpy()
    np.testing.assert_array_equal(z[:, 2] < 0, labels == 1)
    x = (rng.uniform(size=(4, 8, 8, 1)) > 0.5).astype("float32")
    scores = model.score(x, 20, seed=0, y=labels)
    assert np.all(np.isfinite(scores["log_px"]))
    assert model.sample(4, seed=1, labels=labels).shape == (4, 8, 8, 1)


def test_bottom_up_free_bits_floor_the_whole_kl(rng):
    # Bottom-up, a layer's term is not a KL: the floor is λ·d on their sum.
    model = two_layer_vae("bottom_up", free_bits=100.0)
    x = (rng.uniform(size=(4, 8, 8, 1)) > 0.5).astype("float32")
    terms = model.compute_terms(x, training=True, seed=0)
    np.testing.assert_allclose(terms["loss"], terms["reconstruction_loss"] + 500.0, rtol=1e-6)
