"""Learned priors, the IAF posterior and free bits, each against a closed form or an
independent computation; save/load and the served outputs of each."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from helpers import assert_trains_saves_loads_and_serves, make_vae
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm

from keras_vae.iaf import AutoregressiveStep, IAFPosterior
from keras_vae.priors import DiagonalGaussianMixture, GaussianMixture
from keras_vae.settings import ConfigError

SHAPE = (8, 8, 1)
tfd = tfp.distributions


def small(**settings):
    return make_vae(SHAPE, latent_dim=3, hidden_units=(16,), seed=0, **settings)


def randomize(layer, rng, scale=0.5):
    """Sets every weight of ``layer`` to N(0, scale²) draws."""
    for weight in layer.weights:
        weight.assign(rng.normal(scale=scale, size=weight.shape).astype("float32"))


def log_normal_diag(z, mean, log_var):
    """Σ_j log N(z_j; mean_j, exp(log_var_j)) in NumPy, broadcast over leading axes."""
    return norm.logpdf(z, mean, np.exp(0.5 * log_var)).sum(-1)


def test_one_component_mixture_is_the_gaussian_it_is(rng):
    prior = GaussianMixture(num_components=1, seed=0)
    prior.build((3,))
    randomize(prior, rng)
    z = rng.normal(size=(20, 3)).astype("float32")
    mean, scale = prior.means.numpy()[0], np.exp(prior.log_scales.numpy()[0])
    expected = multivariate_normal(mean, np.diag(scale**2)).logpdf(z)
    np.testing.assert_allclose(prior.distribution().log_prob(z).numpy(), expected, rtol=1e-5)


def test_mixture_log_prob_is_the_weighted_sum_of_its_components(rng):
    prior = GaussianMixture(num_components=4, seed=0)
    prior.build((2,))
    randomize(prior, rng)
    z = rng.normal(size=(30, 2)).astype("float32")
    logits = prior.logits.numpy()
    log_weights = logits - logsumexp(logits)
    components = np.stack(
        [
            log_normal_diag(z, m, 2 * s)
            for m, s in zip(prior.means.numpy(), prior.log_scales.numpy(), strict=True)
        ]
    )
    expected = logsumexp(components + log_weights[:, None], axis=0)
    np.testing.assert_allclose(prior.distribution().log_prob(z).numpy(), expected, rtol=1e-5)


def test_mixture_density_keeps_its_digits_for_narrow_components_far_from_the_origin(rng):
    # Components 10⁻³ wide at ±30: the expanded squares cancel over nine orders of magnitude.
    loc = rng.uniform(-30, 30, size=(6, 4))
    scale = rng.uniform(1e-3, 1e-2, size=(6, 4))
    logits = rng.normal(size=6)
    z = (loc[rng.integers(0, 6, size=50)] + scale[0] * rng.normal(size=(50, 4))).astype("float32")
    mixture = DiagonalGaussianMixture(logits, loc, scale)
    log_weights = logits - logsumexp(logits)
    components = np.stack(
        [log_normal_diag(np.float64(z), m, 2 * np.log(s)) for m, s in zip(loc, scale)]
    )
    expected = logsumexp(components + log_weights[:, None], axis=0)
    np.testing.assert_allclose(mixture.log_prob(z).numpy(), expected, rtol=1e-6, atol=1e-3)


def test_mixture_draws_have_the_mixtures_moments(rng):
    loc, scale = rng.normal(size=(3, 2)), rng.uniform(0.2, 1.0, size=(3, 2))
    logits = np.array([0.0, 1.0, -1.0])
    weights = np.exp(logits) / np.exp(logits).sum()
    z = DiagonalGaussianMixture(logits, loc, scale).sample(100_000, seed=(1, 2)).numpy()
    mean = weights @ loc
    variance = weights @ (scale**2 + loc**2) - mean**2
    assert np.all(np.abs(z.mean(0) - mean) < 4 * np.sqrt(variance / 100_000))
    np.testing.assert_allclose(z.var(0), variance, rtol=0.02)


def test_mixture_gradients_equal_tfps_mixture_same_family(rng):
    logits, loc = (tf.Variable(rng.normal(size=s).astype("float32")) for s in ((5,), (5, 3)))
    scale = tf.Variable(rng.uniform(0.3, 2.0, size=(5, 3)).astype("float32"))
    z = tf.constant(rng.normal(size=(8, 3)).astype("float32"))
    grads = []
    for ours in (True, False):
        with tf.GradientTape() as tape:
            tape.watch(z)
            if ours:  # built inside the tape, as the model builds p(z) each step
                mixture = DiagonalGaussianMixture(logits, loc, scale)
            else:
                mixture = tfd.MixtureSameFamily(
                    tfd.Categorical(logits=logits),
                    tfd.MultivariateNormalDiag(loc=loc, scale_diag=scale),
                )
            total = tf.reduce_sum(mixture.log_prob(z))
        grads.append(tape.gradient(total, [logits, loc, scale, z]))
    for ours, theirs in zip(*grads):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-5)


def test_vamp_prior_is_the_mixture_of_the_posteriors_at_its_pseudo_inputs(rng):
    model = small(prior="vamp", num_components=5)
    model.prior.pseudo_inputs.assign(rng.uniform(size=(5, *SHAPE)).astype("float32"))
    params = model.encode_params(model.prior.pseudo_inputs.numpy())
    mean, log_var = params["z_mean"].numpy(), params["z_log_var"].numpy()
    z = rng.normal(size=(7, 3)).astype("float32")
    components = log_normal_diag(z[None], mean[:, None], log_var[:, None])  # [K, n]
    expected = logsumexp(components, axis=0) - np.log(5)
    got = model.prior.distribution(model._posterior_at).log_prob(z).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("prior", ["mixture", "vamp"])
def test_priors_without_a_closed_form_kl_use_the_monte_carlo_estimate(prior, rng):
    model = small(prior=prior)
    assert not model.analytic_kl
    x = (rng.uniform(size=(6, *SHAPE)) > 0.5).astype("float32")
    epsilon = rng.normal(size=(4, 1, 3)).astype("float32")
    log_px_z, log_pz, log_qz, kl = model.log_weights(x, epsilon=epsilon)
    assert kl is None
    scores = model.score(x, 4, epsilon=epsilon)
    expected = np.mean(log_px_z.numpy() - log_qz.numpy() + log_pz.numpy(), axis=0)
    np.testing.assert_allclose(scores["elbo"].numpy(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="has no closed form: use kl='auto' or 'mc'"):
        small(prior=prior, kl="analytic")


def identical_pair(rng, **iaf_settings):
    """A diagonal-Gaussian model and an IAF model with the same networks and heads."""
    plain = small()
    flow = small(posterior="iaf", **iaf_settings)
    flow.encoder.set_weights(plain.encoder.get_weights())
    flow.decoder.set_weights(plain.decoder.get_weights())
    flow.posterior.gaussian.set_weights(plain.posterior.get_weights())
    return plain, flow


@pytest.mark.parametrize("steps", [0, 2])
def test_an_untrained_iaf_is_the_diagonal_gaussian(steps, rng):
    plain, flow = identical_pair(rng, flow_steps=steps)
    x = (rng.uniform(size=(5, *SHAPE)) > 0.5).astype("float32")
    epsilon = rng.normal(size=(3, 1, 3)).astype("float32")
    for a, b in zip(
        plain.log_weights(x, epsilon=epsilon)[:3], flow.log_weights(x, epsilon=epsilon)[:3]
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)
    params = flow.encode_params(x)
    np.testing.assert_allclose(
        flow.posterior.sample(params, 3, epsilon=epsilon).numpy(),
        plain.posterior.sample(plain.encode_params(x), 3, epsilon=epsilon).numpy(),
        atol=1e-6,
    )


def trained_looking_iaf(rng, latent_dim=2, scale=0.4):
    """An IAF posterior (2 steps) on 4 features, every flow weight N(0, scale²)."""
    posterior = IAFPosterior(flow_steps=2, flow_hidden_units=(8,), seed=0)
    posterior.build((None, 4), latent_dim)
    for step in posterior.steps:
        randomize(step, rng, scale=scale)
    params = posterior(tf.constant(rng.normal(size=(3, 4)), tf.float32))
    return posterior, params


def test_an_iaf_step_without_the_gated_marker_is_refused():
    step = AutoregressiveStep((8,), seed=0)
    config = step.get_config()
    assert AutoregressiveStep.from_config(config).get_config() == config
    del config["update"]
    with pytest.raises(ValueError, match="lacks update='gated'"):
        AutoregressiveStep.from_config(config)


def test_iaf_log_q_of_its_own_draws_equals_its_exact_density(rng):
    posterior, params = trained_looking_iaf(rng, latent_dim=3)
    z, log_q = posterior.sample_and_log_prob(params, 5, seed=12)
    assert np.abs(z.numpy() - posterior.gaussian.sample(params, 5, seed=12)).max() > 1e-2
    # log_prob inverts the flow (D sequential passes): independent of the sampling pass.
    exact = posterior.distribution(params).log_prob(z).numpy()
    np.testing.assert_allclose(log_q.numpy(), exact, rtol=1e-4, atol=1e-4)


def test_iaf_density_integrates_to_the_mass_its_draws_put_in_a_box(rng):
    # ∫_box q(z) dz on a fine grid against the fraction of 40,000 draws inside the box:
    # 1 for a box that holds them all, the density and the sampler checked against each other.
    posterior, params = trained_looking_iaf(rng, latent_dim=2, scale=0.25)
    step = 0.05
    grid = np.arange(-12, 12, step) + step / 2
    z = tf.constant(np.stack(np.meshgrid(grid, grid, indexing="ij"), -1)[:, :, None], tf.float32)
    log_q = posterior.distribution(params).log_prob(z).numpy()
    gaussian = posterior.gaussian.distribution(params).log_prob(z).numpy()
    assert np.abs(log_q - gaussian).max() > 1.0  # the flow is far from the identity
    draws = posterior.sample(params, 40_000, seed=5).numpy()
    inside = (np.abs(draws) < 12).all(-1).mean(0)
    np.testing.assert_allclose(np.exp(log_q).sum((0, 1)) * step**2, inside, atol=5e-3)


@pytest.mark.parametrize("settings", [{"posterior": "iaf"}, {"prior": "vamp"}])
def test_dreg_is_refused_where_phi_reaches_the_loss_past_z(settings):
    with pytest.raises(ValueError, match="'dreg' takes φ's gradient through z alone"):
        small(objective="iwae", num_samples=2, gradient_estimator="dreg", **settings)


def test_free_bits_change_the_loss_and_gradient_not_the_reported_elbo(rng):
    x = (rng.uniform(size=(16, *SHAPE)) > 0.5).astype("float32")
    plain = small()
    mean, log_var = (t.numpy() for t in plain.encode_params(x).values())
    kl_bar = (0.5 * (np.exp(log_var) + mean**2 - 1 - log_var)).mean(0)  # per dimension
    floor = float(np.median(kl_bar))  # one dimension under the floor, one over it
    floored = small(free_bits=floor)
    floored.set_weights(plain.get_weights())
    base = plain.compute_terms(x, seed=34)
    terms = floored.compute_terms(x, seed=34)
    for key in ("reconstruction_loss", "kl_loss", "elbo"):
        np.testing.assert_allclose(terms[key].numpy(), base[key].numpy(), rtol=1e-6)
    expected = base["loss"].numpy().mean() + (np.maximum(floor, kl_bar) - kl_bar).sum()
    np.testing.assert_allclose(terms["loss"].numpy().mean(), expected, rtol=1e-5)


def test_free_bits_give_no_kl_gradient_to_dimensions_under_the_floor(rng):
    x = (rng.uniform(size=(16, *SHAPE)) > 0.5).astype("float32")
    model = small(free_bits=100.0)  # every dimension far under its floor
    heads = model.posterior.trainable_weights
    with tf.GradientTape(persistent=True) as tape:
        terms = model.compute_terms(x, seed=34)
        loss, reconstruction = (
            tf.reduce_mean(terms["loss"]),
            tf.reduce_mean(terms["reconstruction_loss"]),
        )
    for a, b in zip(tape.gradient(loss, heads), tape.gradient(reconstruction, heads)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"prior": "mixture", "num_components": 0}, "'num_components' must be >= 1"),
        ({"posterior": "iaf", "flow_steps": -1}, "'flow_steps' must be >= 0"),
        ({"posterior": "iaf", "flow_hidden_units": (0,)}, "'flow_hidden_units' must have"),
        ({"free_bits": -1.0}, "'free_bits' must be finite and >= 0"),
        ({"free_bits": float("nan")}, "'free_bits' must be finite and >= 0"),
        ({"free_bits": 1.0, "objective": "iwae"}, "'free_bits' floors the ELBO's KL term"),
    ],
)
def test_bad_settings_of_the_new_pieces_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        small(**settings)


@pytest.mark.parametrize(
    "settings",
    [
        {"prior": "mixture"},
        {"prior": "vamp", "num_components": 4},
        {"posterior": "iaf"},
        {"architecture": "gated_mlp", "activation": "linear", "prior": "vamp", "num_components": 4},
    ],
)
def test_each_piece_trains_saves_loads_and_serves_the_same_numbers(settings, tmp_path, rng):
    keras.utils.set_random_seed(0)
    x = (rng.uniform(size=(64, *SHAPE)) > 0.5).astype("float32")
    assert_trains_saves_loads_and_serves(small(**settings), x, tmp_path)


def test_the_vamp_prior_refuses_a_flow_posterior():
    with pytest.raises(ValueError, match="needs one that is a function of its parameters alone"):
        small(prior="vamp", posterior="iaf", num_components=3)
