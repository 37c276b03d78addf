"""Importance-weighted evaluation and the IWAE objective, proven on probabilistic PCA."""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf
from helpers import make_vae
from scipy.special import logsumexp
from test_math import LATENT, SIGMA, D, ppca, ppca_data, ppca_log_px, ppca_vae

from keras_vae.cli import load_run_or_model, main
from keras_vae.evaluate import (
    SE_BATCHES,
    _Accumulator,
    draw_noise,
    evaluate,
    importance_weighted,
    k_ladder,
)
from keras_vae.model import VAE


@pytest.fixture(scope="module")
def ppca_case():
    rng = np.random.default_rng(1)
    w, b = ppca(rng)
    x = rng.normal(size=(40, LATENT)) @ w.T + b + SIGMA * rng.normal(size=(40, D))
    model = ppca_vae(w, b)
    rng = np.random.default_rng(2)
    for head in (
        model.posterior.z_mean_head,
        model.posterior.z_log_var_head,
    ):  # a poorer encoder: a real gap
        kernel, bias = head.get_weights()
        head.set_weights(
            [
                kernel + rng.normal(scale=0.1, size=kernel.shape),
                bias + rng.normal(scale=0.1, size=bias.shape),
            ]
        )
    return model, x.astype("float32"), ppca_log_px(x, w, b)


def test_k_ladder():
    assert k_ladder(5000) == [1, 10, 100, 1000, 5000]
    assert k_ladder(1000) == [1, 10, 100, 1000]
    assert k_ladder(1) == [1]


def test_bad_arguments_are_named(ppca_case):
    model, x, _ = ppca_case
    for kwargs, message in [
        ({"num_samples": 0}, "num_samples must be >= 1; got 0"),
        ({"batch_size": -1}, "batch_size must be >= 1; got -1"),
        ({"chunk_size": 0}, "chunk_size must be >= 1; got 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            importance_weighted(model, x, **{"num_samples": 10, **kwargs})
    with pytest.raises(ValueError, match="nothing to evaluate: x has no examples"):
        importance_weighted(model, x[:0], 10)


def test_estimate_converges_to_exact_log_px_from_below(ppca_case):
    model, x, exact = ppca_case
    scores = importance_weighted(model, x, 5000, batch_size=16, chunk_size=1000)
    errors = {k: scores["log_px_by_k"][k] - exact for k in k_ladder(5000)}
    gaps = [np.mean(np.abs(errors[k])) for k in (1, 10, 100, 5000)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.1 * gaps[0], gaps
    # At K = 5000 each example is within 4 of its standard errors (+ float32 slack).
    assert np.all(np.abs(errors[5000]) < 4 * scores["log_px_se"] + 5e-3)
    # Below in expectation: the mean error over examples is ≤ 0 up to its SE, at every K.
    for k in (1, 10, 100):
        e = errors[k]
        assert e.mean() < 2 * e.std(ddof=1) / np.sqrt(len(e))
        assert e.mean() < 0
    # The ELBO is below log p(x), and the gap estimate is the difference.
    assert np.all(scores["elbo"] < exact)
    np.testing.assert_allclose(scores["log_px"], scores["log_px_by_k"][5000])


def test_k1_estimate_equals_the_elbo(ppca_case):
    model, x, _ = ppca_case
    mc_model = VAE.from_config({**model.get_config(), "kl": "mc"})
    mc_model.set_weights(model.get_weights())
    epsilon = np.random.default_rng(0).normal(size=(1, len(x), LATENT)).astype("float32")
    scores = mc_model.score(x, 1, epsilon=epsilon)
    # With one draw, log w = log p(x|z) + log p(z) − log q(z|x) is the (Monte Carlo KL) ELBO.
    np.testing.assert_allclose(scores["log_px"], scores["elbo"], rtol=1e-6)
    # With the closed-form KL the two agree in expectation: over examples, within SEs.
    scores = importance_weighted(model, x, 1)
    diff = scores["log_px"] - scores["elbo"]
    assert abs(diff.mean()) < 4 * diff.std(ddof=1) / np.sqrt(len(diff))


@pytest.mark.parametrize("batch_size", [40, 13])  # 13 × 2 latent numbers: not a multiple of 4
def test_chunking_gives_the_same_numbers(ppca_case, batch_size):
    model, x, _ = ppca_case
    one_pass = importance_weighted(model, x, 300, batch_size=batch_size, chunk_size=300, seed=5)
    chunked = importance_weighted(model, x, 300, batch_size=batch_size, chunk_size=7, seed=5)
    for key in ("elbo", "elbo_se", "kl", "log_px", "log_px_se"):
        np.testing.assert_allclose(chunked[key], one_pass[key], rtol=1e-6, atol=1e-6)
    again = importance_weighted(model, x, 300, batch_size=batch_size, chunk_size=7, seed=5)
    np.testing.assert_array_equal(again["log_px"], chunked["log_px"])


def test_draw_noise_is_the_same_however_chunked_and_standard_normal():
    def noise(first, count, batch_index=3, seed=5):
        return draw_noise(seed, tf.constant(batch_index, tf.int64), first, count, 7, 3).numpy()

    whole = noise(0, 50)
    assert whole.shape == (50, 7, 3)
    pieces = np.concatenate([noise(0, 1), noise(1, 10), noise(11, 39)])
    np.testing.assert_array_equal(pieces, whole)
    # Another batch or seed draws other numbers.
    assert not np.any(noise(0, 50, batch_index=4) == whole)
    assert not np.any(noise(0, 50, seed=6) == whole)
    many = noise(0, 20000).ravel()  # 420,000 numbers: mean and variance within 5 SEs
    assert abs(many.mean()) < 5 / np.sqrt(many.size)
    assert abs(many.var() - 1) < 5 * np.sqrt(2 / many.size)
    assert abs(np.corrcoef(many[:-1], many[1:])[0, 1]) < 5 / np.sqrt(many.size)


def jackknife_se(log_w, batches):
    """√((B − 1)/B Σ_b (L₋b − L̄)²) for L₋b = log of the mean of exp(log_w) [K, n] over the
    draws k outside batch b (k mod B ≠ b), each computed from its own draws."""
    batch_of = np.arange(len(log_w)) % batches
    left_out = np.stack(
        [
            logsumexp(log_w[batch_of != b], axis=0) - np.log(np.sum(batch_of != b))
            for b in range(batches)
        ]
    )
    return np.sqrt((batches - 1) / batches * np.sum((left_out - left_out.mean(0)) ** 2, axis=0))


@pytest.mark.parametrize("num_samples", [1, 7, 57, 400])
def test_log_px_se_is_the_jackknife_over_batches_of_draws(num_samples):
    # Heavy-tailed log weights: a few draws dominate the sum.
    log_w = 3 * np.random.default_rng(4).standard_normal(size=(num_samples, 3)) ** 2
    for chunk in (num_samples, 10):
        acc = _Accumulator(3, num_samples)
        for start in range(0, num_samples, chunk):
            acc.add(log_w[start : start + chunk], np.zeros_like(log_w[start : start + chunk]))
        np.testing.assert_allclose(
            acc.log_px(), logsumexp(log_w, axis=0) - np.log(num_samples), rtol=1e-12
        )
        if num_samples == 1:
            assert np.all(np.isnan(acc.log_px_se()))  # one draw: no spread to measure
        else:
            expected = jackknife_se(log_w, min(SE_BATCHES, num_samples))
            np.testing.assert_allclose(acc.log_px_se(), expected, rtol=1e-10)


@pytest.mark.parametrize("variance_scale", [0.1, 1.5])
def test_log_px_se_matches_the_spread_of_independent_repeats(variance_scale):
    """pPCA with q(z|x) the exact posterior, its variances times ``variance_scale``: at 0.1
    the weights w = p(x) p(z|x) / q(z|x) have infinite variance (heavy-tailed), at 1.5 they
    are bounded. The estimate of every example is then distributed alike, so the mean of the
    reported SE² over examples and repeats must match the variance of the repeats."""
    rng = np.random.default_rng(3)
    w, b = ppca(rng)
    x = ppca_data(rng, w, b, 100).astype("float32")
    model = ppca_vae(w, b)
    kernel, bias = model.posterior.z_log_var_head.get_weights()
    model.posterior.z_log_var_head.set_weights([kernel, bias + np.log(variance_scale)])
    k, repeats = 100, 8
    runs = [importance_weighted(model, x, k, seed=s) for s in range(repeats)]
    estimates = np.stack([run["log_px"] for run in runs])
    se = np.stack([run["log_px_se"] for run in runs])
    spread = estimates.var(axis=0, ddof=1).mean()
    # The delta method √(Var(w) / (K w̄²)) on independent draws of the same estimator.
    delta_var = []
    for s in range(repeats):
        log_px_z, log_pz, log_qz, _ = model.log_weights(x, k, seed=100 + s)
        log_w = np.float64(log_px_z + log_pz - log_qz)
        relative = np.exp(logsumexp(2 * log_w, axis=0) - 2 * logsumexp(log_w, axis=0))
        delta_var.append((k * relative - 1) / k)
    jackknife_ratio, delta_ratio = np.mean(se**2) / spread, np.mean(delta_var) / spread
    # 800 estimates: the ratios' own sampling error is about 10%.
    assert 0.75 < jackknife_ratio < 1.33, jackknife_ratio
    if variance_scale < 0.5:
        assert delta_ratio < 0.6, delta_ratio  # the delta method understates the error
    else:
        assert 0.75 < delta_ratio < 1.33, delta_ratio
        # Light tails: repeats differ by less than 3·√2 SE about as often as normal (0.997).
        within = np.abs(estimates[::2] - estimates[1::2]) <= 3 * np.sqrt(2) * se[::2]
        assert within.mean() > 0.98, within.mean()


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"architecture": "pixelcnn_made", "filters": (4, 4)},
        {"conditional": True, "num_classes": 3},
        {"prior": "hierarchical", "posterior": "ladder", "latent_layers": (2, 1)},
    ],
)
def test_scores_are_the_uncompiled_likelihoods_on_the_same_draws(rng, settings):
    # 5 × 7 pixels: the fused Bernoulli log-likelihood sums two groups of 16 and a padded one.
    model = make_vae((5, 7, 1), latent_dim=3, hidden_units=(16,), seed=0, **settings)
    x = (rng.uniform(size=(6, 5, 7, 1)) > 0.5).astype("float32")
    y = np.arange(6) % 3 if model.conditional else None
    k = 40
    scores = importance_weighted(model, x, k, chunk_size=16, y=y)
    # The same draws, scored with the likelihood's uncompiled log_prob.
    epsilon = draw_noise(0, tf.constant(0, tf.int64), 0, k, 6, 3)
    log_px_z, log_pz, log_qz, kl = (
        None if t is None else np.float64(t) for t in model.log_weights(x, epsilon=epsilon, y=y)
    )
    log_px = logsumexp(log_px_z + log_pz - log_qz, axis=0) - np.log(k)
    np.testing.assert_allclose(scores["log_px"], log_px, rtol=1e-6, atol=1e-4)
    kl = (log_qz - log_pz).mean(0) if kl is None else kl
    np.testing.assert_allclose(scores["elbo"], log_px_z.mean(0) - kl, rtol=1e-6, atol=1e-4)


def test_report_in_nats_and_bits_per_dim(ppca_case):
    model, x, _exact = ppca_case
    report, scores = evaluate(model, x, num_samples=100)
    assert report["num_examples"] == 40 and report["k"] == 100
    assert list(report["log_px_by_k"]) == ["1", "10", "100"]
    np.testing.assert_allclose(report["log_px"]["mean"], scores["log_px"].mean())
    np.testing.assert_allclose(report["log_px"]["se"], scores["log_px"].std(ddof=1) / np.sqrt(40))
    np.testing.assert_allclose(
        report["gap"]["mean"], report["log_px"]["mean"] - report["elbo"]["mean"]
    )
    assert report["bits_per_dim"] is None  # a Gaussian density: no bits/dim


def test_bits_per_dim_of_binary_data(digits):
    model = make_vae((8, 8, 1), latent_dim=2, hidden_units=(16,), seed=0)
    x = (digits[:20] > 0.5).astype("float32")
    report, scores = evaluate(model, x, num_samples=10)
    np.testing.assert_allclose(report["bits_per_dim"], -scores["log_px"].mean() / (64 * np.log(2)))


def test_iwae_objective(digits):
    x = digits[:32]
    k1 = make_vae(
        (8, 8, 1),
        latent_dim=4,
        hidden_units=(16,),
        objective="iwae",
        num_samples=1,
        kl="mc",
        seed=0,
    )
    terms = k1.compute_terms(x, seed=3)
    np.testing.assert_allclose(terms["loss"], -terms["elbo"], rtol=1e-6)  # K = 1: the ELBO
    k5 = VAE.from_config({**k1.get_config(), "num_samples": 5})
    k5.set_weights(k1.get_weights())
    terms = k5.compute_terms(x, seed=3)
    # log mean w ≥ mean log w (Jensen), draw for draw: the IWAE loss is below −ELBO.
    assert np.all(terms["loss"].numpy() <= -terms["elbo"].numpy() + 1e-5)
    k5.compile(optimizer="adam")
    history = k5.fit(digits[:512], epochs=3, batch_size=64, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run trained on the digits for one epoch."""
    tmp_path = tmp_path_factory.mktemp("trained")
    assert (
        main(
            [
                "train",
                "--epochs",
                "1",
                "--hidden-units",
                "16",
                "--latent-dim",
                "3",
                "--plots",
                "false",
                "--quiet",
                "--run-dir",
                str(tmp_path / "run"),
                "--export-dir",
                str(tmp_path / "sm"),
            ]
        )
        == 0
    )
    return tmp_path / "run"


def test_evaluate_is_the_same_on_memory_keras_file_and_run_dir(run_dir, tmp_path, capsys):
    model, config, _ = load_run_or_model(run_dir)
    from keras_vae.data import load
    from keras_vae.fitting import evaluation_copy

    digits = load("digits")
    x = evaluation_copy(config, digits.x_test)[:50]
    # The digits have labels: the command fits the linear probe to the training set's.
    in_memory, _ = evaluate(
        model,
        x,
        num_samples=20,
        seed=1,
        y=digits.y_test[:50],
        x_train=evaluation_copy(config, digits.x_train),
        y_train=digits.y_train,
    )
    reports = []
    # A checkpoint outside its run needs the data named; inside, the run's test set is used.
    elsewhere = tmp_path / "model.keras"
    elsewhere.write_bytes((run_dir / "checkpoints" / "best.keras").read_bytes())
    assert main(["evaluate", str(elsewhere), "--k", "2"]) == 2
    assert "not inside a run directory: name its data with --data" in capsys.readouterr().err
    for target in (run_dir, run_dir / "checkpoints" / "best.keras", elsewhere):
        out = tmp_path / f"{target.name}.json"
        args = [
            "evaluate",
            str(target),
            "--k",
            "20",
            "--seed",
            "1",
            "--limit",
            "50",
            "--output",
            str(out),
            "--per-example",
            str(tmp_path / "scores.npz"),
        ]
        if target == elsewhere:
            args += ["--data", "digits", "--binarize", "dynamic"]
        assert main(args) == 0
        reports.append(json.loads(out.read_text()))
    for report in reports:
        assert report["test_set_sha256"] == in_memory["test_set_sha256"]
        for key in ("elbo", "log_px", "gap"):
            assert report[key]["mean"] == pytest.approx(in_memory[key]["mean"], rel=1e-6)
        got, expected = report["latent"], in_memory["latent"]
        assert got["probe_accuracy"] == expected["probe_accuracy"]
        assert got["active_units"] == expected["active_units"]
        for key in ("kl_per_dimension", "activity"):
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-6)
        assert got["mutual_information"] == pytest.approx(expected["mutual_information"], 1e-6)
    assert np.load(tmp_path / "scores.npz")["log_px"].shape == (50,)


def test_cli_evaluate_probes_only_with_labelled_training_data(run_dir, tmp_path, capsys):
    x = np.random.default_rng(0).uniform(size=(20, 8, 8, 1)).astype("float32")
    labels = np.arange(20) % 2
    # Test labels but no training labels: no probe.
    np.savez(tmp_path / "d.npz", x_train=x, x_test=x, y_test=labels)
    assert main(["evaluate", str(run_dir), "--data", f"npz:{tmp_path / 'd.npz'}", "--k", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["latent"]["probe_accuracy"] is None
    # A run whose training data is gone is scored on its saved test set, without the probe.
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    config = json.loads((moved / "config.json").read_text())
    config["data"]["data"] = f"npz:{tmp_path / 'gone.npz'}"
    (moved / "config.json").write_text(json.dumps(config))
    assert main(["evaluate", str(moved), "--k", "2", "--limit", "10"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["latent"]["probe_accuracy"] is None
    assert "keras-vae: note: no linear probe: the training data of 'npz:" in captured.err


def test_cli_evaluate_names_bad_input(run_dir, tmp_path, capsys):
    x = np.random.default_rng(0).uniform(size=(8, 8, 8)).astype("float32")
    nan = x.copy()
    nan[2, 3, 3] = np.nan
    shifted = x[:, :6, :6]
    cases = [
        # Checked before the test set is binarized, which would turn both into 0s and 1s.
        ({"x_test": nan}, [], "the data contains NaN or inf"),
        ({"x_test": x * 16}, ["--binarize", "none"], r"needs data in [0, 1]"),
        ({"x_test": x * 16}, [], r"needs data in [0, 1]"),
        ({"x_test": shifted}, [], "expects inputs of shape (batch,) + (8, 8, 1); got shape"),
    ]
    for arrays, flags, message in cases:
        np.savez(tmp_path / "d.npz", x_train=x, **arrays)
        assert (
            main(["evaluate", str(run_dir), "--data", f"npz:{tmp_path / 'd.npz'}", *flags]) == 2
        ), message
        assert message in capsys.readouterr().err
    for flag, value in (("--limit", "0"), ("--k", "-3"), ("--chunk-size", "2.5")):
        with pytest.raises(SystemExit):
            main(["evaluate", str(run_dir), flag, value])
        assert f"argument {flag}: must be an integer >= 1; got '{value}'" in capsys.readouterr().err
    (tmp_path / "junk.keras").write_bytes(b"not a model")
    assert main(["evaluate", str(tmp_path / "junk.keras"), "--data", "digits"]) == 2
    assert "junk.keras is not a .keras model: not a zip archive" in capsys.readouterr().err


def test_the_rate_is_the_monte_carlo_kl_where_there_is_no_closed_form(ppca_case):
    model, x, _ = ppca_case
    # A one-component mixture at N(0, I): the same model, without a closed-form KL.
    mixture = make_vae(
        (D,),
        latent_dim=LATENT,
        hidden_units=(),
        likelihood="gaussian",
        sigma=SIGMA,
        prior="mixture",
        num_components=1,
        seed=0,
    )
    mixture.decoder.set_weights(model.decoder.get_weights())
    mixture.posterior.set_weights(model.posterior.get_weights())
    mixture.prior.set_weights([np.zeros(1), np.zeros((1, LATENT)), np.zeros((1, LATENT))])
    closed = importance_weighted(model, x, 500, seed=3)
    estimated = importance_weighted(mixture, x, 500, seed=3)
    np.testing.assert_allclose(estimated["log_px"], closed["log_px"], rtol=1e-5)
    # (1/K) Σ_k log q(z_k|x) − log p(z_k): the closed form up to its Monte Carlo error.
    diff = estimated["kl"] - closed["kl"]
    assert abs(diff.mean()) < 4 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert np.abs(diff).max() > 1e-4
    np.testing.assert_allclose(
        estimated["elbo"] + estimated["kl"], closed["elbo"] + closed["kl"], rtol=1e-5
    )
