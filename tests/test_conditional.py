"""Conditional VAEs: q(z|x, y) and p(x|z, y) on class labels or real vectors, against a
linear-Gaussian model's closed form, through save/load, export and the data pipeline."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import json_server, make_vae, rest_stand_in
from scipy.stats import multivariate_normal

from keras_vae import data as datasets
from keras_vae import serving
from keras_vae.cli import main
from keras_vae.evaluate import evaluate, importance_weighted
from keras_vae.export import SCORE_SAMPLES, export_model, score_epsilon

D, LATENT, CLASSES, SIGMA = 6, 2, 3, 0.5


def linear_model(**settings):
    """A class-conditional VAE with linear networks and the Gaussian likelihood of σ."""
    return make_vae(
        (D,),
        latent_dim=LATENT,
        hidden_units=(),
        likelihood="gaussian",
        sigma=SIGMA,
        conditional=True,
        num_classes=CLASSES,
        seed=0,
        **settings,
    )


def linear_gaussian(rng):
    """A conditional linear-Gaussian model x = W z + B onehot(y) + b + σ·noise, z ~ N(0, I),
    with its exact posterior q(z|x, y) = p(z|x, y) set by hand; and (W, B, b)."""
    # W with orthogonal columns, so that the exact posterior is diagonal.
    w = np.linalg.qr(rng.normal(size=(D, LATENT)))[0] * np.array([2.0, 0.7])
    big_b, b = rng.normal(size=(D, CLASSES)), rng.normal(size=D)
    model = linear_model(kl="mc")
    m_inv = np.linalg.inv(w.T @ w + SIGMA**2 * np.eye(LATENT))
    # Decoder: x̂ = [z, c] [Wᵀ; Bᵀ] + b. Posterior: μ = (x − b − c Bᵀ) W M⁻¹, σ² = σ² diag M⁻¹.
    model.decoder.layers[0].set_weights([np.vstack([w.T, big_b.T]), b])
    model.posterior.z_mean_head.set_weights(
        [np.vstack([w @ m_inv, -big_b.T @ w @ m_inv]), -(b @ w @ m_inv)]
    )
    model.posterior.z_log_var_head.set_weights(
        [np.zeros((D + CLASSES, LATENT)), np.log(SIGMA**2 * np.diag(m_inv))]
    )
    return model, (w, big_b, b)


def draws(rng, params, n):
    w, big_b, b = params
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(size=(n, LATENT)) @ w.T + big_b[:, y].T + b + SIGMA * rng.normal(size=(n, D))
    return x.astype("float32"), y


def closed_form(x, y, params):
    """log p(x|y) = log N(x; B onehot(y) + b, W Wᵀ + σ² I)."""
    w, big_b, b = params
    cov = w @ w.T + SIGMA**2 * np.eye(D)
    return np.array([multivariate_normal(big_b[:, c] + b, cov).logpdf(row) for row, c in zip(x, y)])


def test_log_p_x_given_y_equals_the_closed_form_at_the_exact_posterior(rng):
    model, params = linear_gaussian(rng)
    x, y = draws(rng, params, 40)
    exact = closed_form(x, y, params)
    scores = model.score(x, 5, seed=3, y=y)
    # At q = p(z|x, y) every importance weight equals p(x|y): exact with any draws.
    np.testing.assert_allclose(scores["log_px"].numpy(), exact, rtol=1e-4)
    np.testing.assert_allclose(scores["elbo"].numpy(), exact, rtol=1e-4)
    other = np.roll(y, 1)  # the wrong labels give another, lower, likelihood
    assert model.score(x, 5, seed=3, y=other)["log_px"].numpy().mean() < exact.mean() - 1


@pytest.mark.parametrize(
    "y, error, message",
    [
        (None, ValueError, "is conditional: it needs labels y"),
        (np.zeros((4, 3)), ValueError, r"expects labels y of shape \(batch,\) \+ \(\)"),
        (np.array([0, 1, 2, 3]), tf.errors.InvalidArgumentError, r"whole classes in \[0, 3\)"),
        (np.array([0, 1, -1, 2]), tf.errors.InvalidArgumentError, r"whole classes in \[0, 3\)"),
        (np.array([0, 1, 2]), tf.errors.InvalidArgumentError, "different batch sizes"),
    ],
)
def test_bad_labels_are_refused_with_a_message_that_names_them(rng, y, error, message):
    model, params = linear_gaussian(rng)
    x, _ = draws(rng, params, 4)
    with pytest.raises(error, match=message):
        model.score(x, 2, seed=1, y=y)


def test_check_labels_names_the_first_bad_label():
    model = make_vae(
        (D,), latent_dim=2, hidden_units=(), likelihood="gaussian", conditional=True, num_classes=3
    )
    model.check_labels(np.array([0, 2, 1]))
    with pytest.raises(ValueError, match=r"label 1 is 2.5"):
        model.check_labels(np.array([0, 2.5, 1]))
    with pytest.raises(ValueError, match=r"one class per example; got shape \(3, 1\)"):
        model.check_labels(np.zeros((3, 1)))


def class_model():
    return make_vae(
        (8, 8, 1), latent_dim=2, hidden_units=(16,), conditional=True, num_classes=3, seed=0
    )


def binary(rng, n):
    return (rng.uniform(size=(n, 8, 8, 1)) > 0.5).astype("float32"), rng.integers(0, 3, n)


def test_fit_on_x_and_labels_then_save_load_and_serve_the_same_numbers(rng, tmp_path):
    keras.utils.set_random_seed(0)
    model = class_model()
    x, y = binary(rng, 64)
    model.compile(optimizer="adam")
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    path = tmp_path / "cvae.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    epsilon = score_epsilon(2)
    expected = model.score(x[:5], SCORE_SAMPLES, epsilon=epsilon, y=y[:5])
    np.testing.assert_allclose(
        restored.score(x[:5], SCORE_SAMPLES, epsilon=epsilon, y=y[:5])["log_px"].numpy(),
        expected["log_px"].numpy(),
        rtol=1e-6,
    )
    served = tf.saved_model.load(str(export_model(model, tmp_path / "export", "cvae")))
    labels = tf.constant(y[:5], tf.int64)
    scored = served.signatures["score"](x=tf.constant(x[:5]), y=labels)
    for key in ("elbo", "log_px"):
        np.testing.assert_allclose(scored[key].numpy(), expected[key].numpy(), rtol=1e-4)
    encoded = served.signatures["encode"](x=tf.constant(x[:5]), y=labels)
    params = model.encode_params(x[:5], y=y[:5])
    np.testing.assert_allclose(encoded["z_mean"].numpy(), params["z_mean"].numpy(), rtol=1e-5)
    z = params["z_mean"].numpy()
    decoded = served.signatures["decode"](z=tf.constant(z), y=labels)
    np.testing.assert_allclose(
        decoded["mean"].numpy(), model.decode(z, y=y[:5]).mean().numpy(), rtol=1e-5
    )
    sampled = served.signatures["sample"](
        seed=tf.constant([7, 7, 7], tf.int64), y=tf.constant([0, 1, 2], tf.int64)
    )
    same_z = np.repeat(model.sample_prior(1, seed=(7, 0)).numpy(), 3, axis=0)
    np.testing.assert_allclose(sampled["z"].numpy(), same_z, rtol=1e-6)
    # One z, three classes: three different images, each the model's own p(x|z, y).
    np.testing.assert_allclose(
        sampled["mean"].numpy(), model.decode(same_z, y=[0, 1, 2]).mean().numpy(), rtol=1e-5
    )
    assert np.abs(sampled["mean"].numpy()[0] - sampled["mean"].numpy()[1]).max() > 1e-4
    # The serving client sends the labels as one more input, in either REST format.
    with json_server(rest_stand_in(served.signatures)) as base:
        url = f"{base}/v1/models/cvae:predict"
        rows = serving.predict_rest(url, "sample", {"seed": [7, 7, 7], "y": [0, 1, 2]})
        columns = serving.predict_rest(
            url, "score", {"x": x[:5], "y": y[:5]}, row_format=False, timeout=20
        )
    np.testing.assert_allclose(rows["mean"], sampled["mean"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(columns["log_px"], scored["log_px"].numpy(), rtol=1e-6)
    request = serving.grpc_request("cvae", "score", {"x": x[:2], "y": y[:2]})
    assert tf.make_ndarray(request.inputs["y"]).dtype == np.int64


def test_predict_reads_the_labels_of_a_conditional_model(rng):
    model = class_model()
    x, y = binary(rng, 10)
    np.testing.assert_allclose(
        model.predict((x, y), batch_size=4, verbose=0), model.reconstruct(x, y).numpy(), rtol=1e-6
    )
    with pytest.raises(ValueError, match="is conditional: it needs labels y"):
        model.predict(x, batch_size=4, verbose=0)


def test_a_model_conditional_on_vectors_reads_them_as_they_are(rng):
    model = make_vae(
        (8, 8, 1), latent_dim=2, hidden_units=(16,), conditional=True, condition_dim=3, seed=0
    )
    x, _ = binary(rng, 4)
    one_hot = np.eye(3, dtype="float32")[[0, 1, 2, 0]]
    as_classes = class_model()
    as_classes.set_weights(model.get_weights())
    np.testing.assert_allclose(
        model.score(x, 3, seed=1, y=one_hot)["log_px"].numpy(),
        as_classes.score(x, 3, seed=1, y=[0, 1, 2, 0])["log_px"].numpy(),
        rtol=1e-6,
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="labels y contain NaN or inf"):
        model.score(x, 3, seed=1, y=np.full((4, 3), np.nan, "float32"))


def test_vamp_prior_is_refused_for_a_conditional_model():
    with pytest.raises(ValueError, match="a conditional model does not have without labels"):
        make_vae(
            (8, 8, 1),
            latent_dim=2,
            hidden_units=(16,),
            prior="vamp",
            conditional=True,
            num_classes=3,
            seed=0,
        )


def test_the_training_stream_carries_labels_with_their_examples():
    x = np.arange(10, dtype="float32").reshape(10, 1, 1, 1)
    y = np.arange(10) * 10
    stream = datasets.training_dataset(x, 4, seed=0, binarize=False, initial_epoch=0, epochs=2, y=y)
    batches = list(stream.as_numpy_iterator())
    assert len(batches) == 6
    for x_batch, y_batch in batches:
        np.testing.assert_array_equal(y_batch, x_batch.reshape(-1) * 10)


def test_npz_labels_may_be_vectors_and_are_checked_per_example(tmp_path):
    path = tmp_path / "d.npz"
    x = np.zeros((4, 2, 2), "uint8")
    np.savez(path, x_train=x, x_test=x, y_train=np.zeros((4, 3)), y_test=np.zeros((4, 3)))
    assert datasets.load(f"npz:{path}").y_train.shape == (4, 3)
    np.savez(path, x_train=x, x_test=x, y_train=np.zeros((3,)))
    with pytest.raises(ValueError, match=r"y_train has shape \(3,\); expected one label"):
        datasets.load(f"npz:{path}")


def test_evaluate_scores_log_p_x_given_y_in_closed_form(rng):
    model, params = linear_gaussian(rng)
    x, y = draws(rng, params, 30)
    report, scores = evaluate(model, x, num_samples=20, batch_size=8, chunk_size=7, y=y)
    np.testing.assert_allclose(scores["log_px"], closed_form(x, y, params), rtol=1e-4)
    assert report["latent"]["probe_accuracy"] is None  # labels alone condition, no probe
    with pytest.raises(ValueError, match="conditional: evaluating it needs the labels y"):
        importance_weighted(model, x, 4)


def test_a_conditional_run_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--hidden-units", "16", "--latent-dim", "2", "--batch-size", "256", "--quiet"]
    argv = ["train", "--conditional", "--epochs", "1", "--run-dir", str(run)]
    assert main([*argv, "--export-dir", str(tmp_path / "sm"), *common]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["conditional"] and config["model"]["num_classes"] == 10
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    model = keras.saving.load_model(run / "checkpoints" / "last.keras")
    x, y = datasets.load_test_set(run / "test_set.npz")
    _, scores = evaluate(model, x, 100, y=y)  # the run's own K and seed: the same figure
    assert metrics["log_px"]["mean"] == pytest.approx(scores["log_px"].mean(), rel=1e-6)
    assert 0 <= metrics["latent"]["probe_accuracy"] <= 1
    assert main(["evaluate", str(run), "--k", "3", "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["num_examples"] == len(x)
    assert (run / "plots" / "samples.png").is_file()
    served = tf.saved_model.load(str(tmp_path / "sm" / "vae" / "1"))
    assert set(served.signatures["sample"].structured_input_signature[1]) == {"seed", "y"}
    images = tmp_path / "per_class.npy"
    assert (
        main(["sample", str(run), "--n", "20", "--label", "3", "7", "--output", str(images)]) == 0
    )
    assert np.load(images).shape == (20, 8, 8, 1)
    labels = np.repeat([3, 7], 10)  # ten of each label, in turn (one epoch: best is last)
    np.testing.assert_allclose(
        np.load(images), model.sample(20, seed=0, labels=labels).numpy(), rtol=1e-6
    )
    assert main(["sample", str(run), "--output", str(images)]) == 2
    assert "give --label" in capsys.readouterr().err


def linear_gaussian_with_prior(rng, kl):
    """``linear_gaussian`` with the learned prior p(z|y) = N(m_y, diag s²) (class means m_y,
    shared scales s) set by hand, its exact posterior, and (W, B, b, m, s)."""
    w = np.linalg.qr(rng.normal(size=(D, LATENT)))[0] * np.array([2.0, 0.7])
    big_b, b = rng.normal(size=(D, CLASSES)), rng.normal(size=D)
    m, s = rng.normal(size=(CLASSES, LATENT)), np.array([0.8, 1.5])
    model = linear_model(prior="conditional_gaussian", kl=kl)
    model.prior.set_weights(
        [np.hstack([m, np.zeros((CLASSES, LATENT))]), np.concatenate([np.zeros(LATENT), np.log(s)])]
    )
    model.decoder.layers[0].set_weights([np.vstack([w.T, big_b.T]), b])
    # Posterior covariance Σ = (diag s⁻² + WᵀW/σ²)⁻¹ (diagonal: W's columns are orthogonal),
    # mean Σ (m_y/s² + Wᵀ(x − B onehot(y) − b)/σ²).
    cov = 1 / (1 / s**2 + np.diag(w.T @ w) / SIGMA**2)
    model.posterior.z_mean_head.set_weights(
        [
            np.vstack([w * cov / SIGMA**2, m * cov / s**2 - big_b.T @ w * cov / SIGMA**2]),
            -(b @ w) * cov / SIGMA**2,
        ]
    )
    model.posterior.z_log_var_head.set_weights([np.zeros((D + CLASSES, LATENT)), np.log(cov)])
    return model, (w, big_b, b, m, s)


@pytest.mark.parametrize("kl", ["auto", "mc"])
def test_a_learned_prior_p_z_given_y_gives_log_p_x_given_y_in_closed_form(rng, kl):
    model, (w, big_b, b, m, s) = linear_gaussian_with_prior(rng, kl)
    assert model.analytic_kl == (kl == "auto")
    y = rng.integers(0, CLASSES, 30)
    z = m[y] + s * rng.normal(size=(30, LATENT))
    x = (z @ w.T + big_b[:, y].T + b + SIGMA * rng.normal(size=(30, D))).astype("float32")
    # log p(x|y) = log N(x; W m_y + B onehot(y) + b, W diag s² Wᵀ + σ² I).
    cov = w @ np.diag(s**2) @ w.T + SIGMA**2 * np.eye(D)
    exact = np.array(
        [multivariate_normal(w @ m[c] + big_b[:, c] + b, cov).logpdf(row) for row, c in zip(x, y)]
    )
    scores = model.score(x, 5, seed=3, y=y)
    np.testing.assert_allclose(scores["log_px"].numpy(), exact, rtol=1e-4)
    log_px_z, _, _, closed = model.log_weights(x, 5, seed=3, y=y)
    if kl == "mc":  # log p(x|z) + log p(z|y) − log q(z|x, y) = log p(x|y) at every draw
        np.testing.assert_allclose(scores["elbo"].numpy(), exact, rtol=1e-4)
    else:  # KL(N(μ, σ²) ‖ N(m_y, s²)) = Σ_j log(s_j/σ_j) + (σ_j² + (μ_j − m_yj)²)/(2s_j²) − ½
        params = model.encode_params(x, y=y)
        mu, var = params["z_mean"].numpy(), np.exp(params["z_log_var"].numpy())
        by_hand = np.sum(
            np.log(s) - 0.5 * np.log(var) + (var + (mu - m[y]) ** 2) / (2 * s**2) - 0.5, 1
        )
        np.testing.assert_allclose(closed.numpy(), by_hand, rtol=1e-5)
        np.testing.assert_allclose(
            scores["elbo"].numpy(), log_px_z.numpy().mean(0) - by_hand, rtol=1e-5
        )
    report, evaluated = evaluate(model, x, num_samples=20, batch_size=8, chunk_size=7, y=y)
    np.testing.assert_allclose(evaluated["log_px"], exact, rtol=1e-4)
    # The per-dimension KL to p(z_j|y) adds up to the whole closed-form KL.
    whole = model.posterior.distribution(model.encode_params(x, y=y)).kl_divergence(
        model.prior.distribution(c=model.condition(y))
    )
    assert sum(report["latent"]["kl_per_dimension"]) == pytest.approx(
        float(tf.reduce_mean(whole)), rel=1e-5
    )
    # The report's rate is the closed form wherever there is one, whatever trains the model.
    np.testing.assert_allclose(evaluated["kl"], whole.numpy(), rtol=1e-5)
    assert report["kl"]["mean"] == pytest.approx(evaluated["kl"].mean(), rel=1e-9)


def test_the_conditional_prior_starts_at_n_0_i_and_draws_each_label_from_its_own(rng):
    model = linear_model(prior="conditional_gaussian")
    z = rng.normal(size=(5, LATENT)).astype("float32")
    untrained = model.prior.distribution(c=model.condition(np.array([0, 1, 2, 0, 1])))
    np.testing.assert_allclose(
        untrained.log_prob(z).numpy(), multivariate_normal(np.zeros(LATENT)).logpdf(z), rtol=1e-6
    )
    m, s = rng.normal(size=(CLASSES, LATENT)), np.array([0.5, 2.0])
    model.prior.set_weights(
        [np.hstack([m, np.zeros((CLASSES, LATENT))]), np.concatenate([np.zeros(LATENT), np.log(s)])]
    )
    labels = np.repeat([0, 2], 4000)
    draws = model.sample_prior(len(labels), seed=5, labels=labels).numpy()
    for label, part in zip([0, 2], np.split(draws, 2)):
        np.testing.assert_allclose(part.mean(axis=0), m[label], atol=4 * s.max() / np.sqrt(4000))
        np.testing.assert_allclose(part.std(axis=0), s, rtol=0.05)


def test_a_model_with_p_z_given_y_saves_loads_and_serves_the_same_draws(rng, tmp_path):
    keras.utils.set_random_seed(0)
    model = make_vae(
        (8, 8, 1),
        latent_dim=2,
        hidden_units=(16,),
        prior="conditional_gaussian",
        free_bits=0.5,
        conditional=True,
        num_classes=3,
        seed=0,
    )
    x, y = binary(rng, 64)
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    kernel = model.prior.get_weights()[0]
    assert np.abs(kernel).max() > 1e-3  # the per-class means and scales moved from zero
    path = tmp_path / "prior.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    labels = np.array([0, 1, 2])
    np.testing.assert_allclose(
        restored.sample_prior(3, seed=4, labels=labels).numpy(),
        model.sample_prior(3, seed=4, labels=labels).numpy(),
        rtol=1e-6,
    )
    served = tf.saved_model.load(str(export_model(model, tmp_path / "export", "prior")))
    sampled = served.signatures["sample"](
        seed=tf.constant([7, 7, 7], tf.int64), y=tf.constant(labels, tf.int64)
    )
    # Each row's z is the draw of seed (7, 0) from its own label's p(z|y).
    expected = np.concatenate(
        [model.sample_prior(1, seed=(7, 0), labels=[label]).numpy() for label in labels]
    )
    np.testing.assert_allclose(sampled["z"].numpy(), expected, rtol=1e-5)
    assert np.abs(expected[0] - expected[1]).max() > 1e-4


def test_the_conditional_prior_is_refused_for_an_unconditional_model():
    with pytest.raises(ValueError, match=r"is p\(z\|y\): it needs a conditional model"):
        make_vae((8, 8, 1), latent_dim=2, hidden_units=(16,), prior="conditional_gaussian")
