"""Importance-weighted evaluation and the IWAE objective, proven on probabilistic PCA."""

import json

import numpy as np
import pytest
from helpers import make_vae
from test_math import LATENT, SIGMA, D, ppca, ppca_log_px, ppca_vae

from keras_vae.cli import load_run_or_model, main
from keras_vae.evaluate import evaluate, importance_weighted, k_ladder
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


def test_chunking_gives_the_same_numbers(ppca_case):
    model, x, _ = ppca_case
    one_pass = importance_weighted(model, x, 300, batch_size=40, chunk_size=300, seed=5)
    chunked = importance_weighted(model, x, 300, batch_size=40, chunk_size=7, seed=5)
    for key in ("elbo", "elbo_se", "log_px", "log_px_se"):
        np.testing.assert_allclose(chunked[key], one_pass[key], rtol=1e-6, atol=1e-6)
    again = importance_weighted(model, x, 300, batch_size=40, chunk_size=7, seed=5)
    np.testing.assert_array_equal(again["log_px"], chunked["log_px"])


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

    x = evaluation_copy(config, load("digits").x_test)[:50]
    in_memory, _ = evaluate(model, x, num_samples=20, seed=1)
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
    assert np.load(tmp_path / "scores.npz")["log_px"].shape == (50,)


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
