"""Mixed precision: float16/bfloat16 networks with float32 variables, distributions, losses
and exports."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import make_vae

from keras_vae.cli import main


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
def test_gaussian_means_stay_float32_under_mixed_precision(architecture):
    """μ = b exactly (zero output kernel; b = 0.3, which bfloat16 rounds to 0.30078) and
    σ = 10⁻³: log p(x = b | z) = −D (log σ + ½ log 2π) in closed form. A 16-bit output
    layer would miss it by D (7.8·10⁻⁴)²/(2σ²) ≈ 19 nats."""

    model = make_vae(
        (8, 8, 1),
        latent_dim=4,
        architecture=architecture,
        hidden_units=(16,),
        filters=(4, 8),
        likelihood="gaussian",
        learn_sigma="per_pixel",
        sigma=1e-3,
        dtype="mixed_bfloat16",
        seed=0,
    )
    output = [layer for layer in model.decoder.layers if hasattr(layer, "kernel")][-1]
    output.kernel.assign(np.zeros(output.kernel.shape, "float32"))
    output.bias.assign(np.full(output.bias.shape, 0.3, "float32"))
    x = np.full((2, 8, 8, 1), 0.3, "float32")
    log_px = model.decode(np.ones((2, 4), "float32")).log_prob(x).numpy()
    sigma = np.exp(np.float32(np.log(1e-3)))  # σ as stored, log σ in float32
    np.testing.assert_allclose(log_px, -64 * (np.log(sigma) + 0.5 * np.log(2 * np.pi)), rtol=1e-5)


def test_mixed_precision_trains_and_exports_float32(tmp_path):
    assert (
        main(
            [
                "train",
                "--precision",
                "mixed_float16",
                "--epochs",
                "2",
                "--hidden-units",
                "32",
                "--latent-dim",
                "3",
                "--quiet",
                "--plots",
                "false",
                "--run-dir",
                str(tmp_path / "run"),
                "--export-dir",
                str(tmp_path / "sm"),
            ]
        )
        == 0
    )
    import keras

    model = keras.saving.load_model(tmp_path / "run" / "checkpoints" / "last.keras")
    assert model.encoder.layers[1].dtype_policy.name == "mixed_float16"
    assert model.decoder.layers[-2].dtype_policy.name == "mixed_float16"  # output
    assert model.decode(tf.zeros((2, 3))).distribution.logits.dtype == tf.float32
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(history) == 3
    loaded = tf.saved_model.load(str(tmp_path / "sm" / "vae" / "1"))
    x = tf.constant(np.random.default_rng(0).uniform(size=(2, 8, 8, 1)).astype("float32"))
    for name in ("serving_default", "score"):
        for value in loaded.signatures[name](x=x).values():
            assert value.dtype == tf.float32 and np.all(np.isfinite(value.numpy()))
    assert keras.config.dtype_policy().name == "float32"  # the global policy is untouched


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_computes_the_float32_models_elbo(architecture, precision):
    """The same weights and noise give the same per-example ELBO terms in float32 and under
    a mixed policy, up to the 16-bit rounding of the networks' activations (bfloat16 keeps
    8 significant bits, float16 11)."""
    import keras

    from keras_vae.data import load

    keras.utils.set_random_seed(0)
    x = load("digits").x_test[:64]
    models = [
        make_vae(
            (8, 8, 1),
            latent_dim=4,
            architecture=architecture,
            hidden_units=(32,),
            filters=(8, 16),
            seed=0,
            dtype=dtype,
        )
        for dtype in ("float32", precision)
    ]
    models[1].set_weights(models[0].get_weights())
    epsilon = np.random.default_rng(0).normal(size=(1, 64, 4)).astype("float32")
    (log_px32, _, _, kl32), (log_px16, _, _, kl16) = (
        model.log_weights(x, epsilon=epsilon, densities=False) for model in models
    )
    assert log_px16.dtype == kl16.dtype == tf.float32
    # At least 5 times the largest differences seen (log p(x|z) is about −45 nats here).
    rtol, atol = (3e-3, 0.05) if precision == "mixed_bfloat16" else (5e-4, 0.01)
    np.testing.assert_allclose(log_px16, log_px32, rtol=rtol)
    np.testing.assert_allclose(kl16, kl32, atol=atol)
    assert not np.array_equal(log_px16, log_px32)  # it really ran in 16 bits
