"""The VAE as a Keras model: fit/evaluate/predict, metrics, saving, errors."""

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import make_vae, posterior_params, user_networks

from keras_vae import VAE, FusedAdam


def small_vae(data_shape=(8, 8, 1), **kwargs):
    kwargs = {"latent_dim": 4, "hidden_units": (32,), "seed": 0, **kwargs}
    model = make_vae(data_shape, **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


def test_closed_form_kl_formula_in_metrics_is_mean_over_examples(digits):
    # 100 examples in batches of 32 (last batch 4): the metric must weight examples, not batches.
    model = small_vae()
    x = digits[:100]
    mu, log_var = (t.numpy().astype("float64") for t in posterior_params(model, x))
    kl = 0.5 * np.sum(np.exp(log_var) + mu**2 - 1 - log_var, axis=-1)
    results = model.evaluate(x, batch_size=32, verbose=0, return_dict=True)
    np.testing.assert_allclose(results["kl_loss"], kl.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        results["elbo"], -results["reconstruction_loss"] - results["kl_loss"], rtol=1e-5
    )
    np.testing.assert_allclose(results["loss"], -results["elbo"], rtol=1e-5)


@pytest.mark.parametrize("architecture", ["mlp", "conv", "made"])
def test_a_few_epochs_on_digits_lower_the_test_loss(digits, architecture):
    model = small_vae(architecture=architecture, hidden_units=(64,), latent_dim=8)
    train, test = digits[:1500], digits[1500:]
    before = model.evaluate(test, verbose=0, return_dict=True)
    history = model.fit(train, validation_data=(test,), epochs=8, batch_size=64, verbose=0)
    after = model.evaluate(test, verbose=0, return_dict=True)
    assert set(history.history) >= {
        "loss",
        "reconstruction_loss",
        "kl_loss",
        "elbo",
        "val_loss",
        "val_elbo",
    }
    # An untrained model's test loss on digits is ≈ 45 nats; a trained one is < 30.
    assert after["loss"] < before["loss"] - 10, (before, after)
    assert after["elbo"] > -30


def test_fit_on_tf_data_with_labels_and_predict(digits):
    model = small_vae()
    ds = tf.data.Dataset.from_tensor_slices((digits[:256], np.arange(256))).batch(64)
    model.fit(ds, epochs=1, verbose=0)
    recon = model.predict(digits[:10], verbose=0)
    assert recon.shape == (10, 8, 8, 1)
    assert np.all((recon >= 0) & (recon <= 1))  # Bernoulli means are probabilities
    np.testing.assert_allclose(recon, model.reconstruct(digits[:10]).numpy(), rtol=1e-5)


def test_public_api_shapes_and_reproducible_sampling(digits):
    model = small_vae(likelihood="gaussian", learn_sigma="shared")
    posterior = model.encode(digits[:3])
    assert posterior.batch_shape == (3,) and posterior.event_shape == (4,)
    likelihood = model.decode(tf.zeros((2, 5, 4)))
    assert likelihood.batch_shape == (2, 5) and likelihood.event_shape == (8, 8, 1)
    np.testing.assert_array_equal(model.sample(6, seed=1), model.sample(6, seed=1))
    assert model.sample(6, seed=1).shape == (6, 8, 8, 1)
    assert model.elbo(digits[:7]).shape == (7,)
    assert any(w is model.likelihood.log_sigma for w in model.trainable_weights)


def test_kl_warmup_scales_beta_with_optimizer_steps(digits):
    model = small_vae(beta=2.0, kl_warmup_steps=10)
    assert float(model.current_beta()) == pytest.approx(0.2)  # step 1 of 10
    model.fit(digits[:128], batch_size=32, epochs=1, verbose=0)  # 4 steps
    assert float(model.current_beta()) == pytest.approx(1.0)  # step 5 of 10
    model.fit(digits[:256], batch_size=32, epochs=1, verbose=0)  # 8 more steps
    assert float(model.current_beta()) == pytest.approx(2.0)


def test_beta_weights_the_kl_in_the_loss(digits):
    model = small_vae(beta=3.0, seed=1)
    terms = model.compute_terms(digits[:16], seed=2)
    np.testing.assert_allclose(
        terms["loss"], terms["reconstruction_loss"] + 3.0 * terms["kl_loss"], rtol=1e-6
    )


def test_config_round_trip():
    model = small_vae(
        architecture="conv",
        likelihood="gaussian",
        learn_sigma="per_pixel",
        dropout=0.2,
        beta=0.5,
        kl_warmup_steps=7,
        kl="mc",
        objective="iwae",
        num_samples=3,
        gradient_estimator="dreg",
    )
    config = model.get_config()
    json.dumps(config)  # plain JSON
    clone = VAE.from_config(config)
    assert clone.get_config() == config
    assert [w.shape for w in clone.weights] == [w.shape for w in model.weights]


@pytest.mark.parametrize("activation", ["linear", "tanh"])
def test_gated_mlp_layers_are_the_activation_times_the_sigmoid_gate(activation):
    rng = np.random.default_rng(0)
    model = small_vae(architecture="gated_mlp", hidden_units=(5, 3), activation=activation)
    z = rng.normal(size=(6, 4)).astype("float32")
    for layer in model.decoder.layers[:2]:
        layer.dense.kernel.assign(rng.normal(size=layer.dense.kernel.shape))
        layer.dense.bias.assign(rng.normal(size=layer.dense.bias.shape))
    # z → a(W z + b) ⊙ sigmoid(V z + c), twice (widths 3 then 5), then the linear output.
    h = np.float64(z)
    for layer in model.decoder.layers[:2]:
        pre = h @ layer.dense.kernel.numpy() + layer.dense.bias.numpy()
        linear, gate = pre[:, : layer.units], pre[:, layer.units :]
        h = (np.tanh(linear) if activation == "tanh" else linear) / (1 + np.exp(-gate))
    output = model.decoder.layers[2]
    logits = (h @ output.kernel.numpy() + output.bias.numpy()).reshape(6, 8, 8, 1)
    assert [layer.units for layer in model.decoder.layers[:2]] == [3, 5]
    np.testing.assert_allclose(model.decoder(z).numpy(), logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
def test_dropout_acts_on_the_decoder_only_while_training(architecture):
    model = small_vae(architecture=architecture, filters=(4, 8), dropout=0.5)
    plain = small_vae(architecture=architecture, filters=(4, 8))
    for source, target in zip(model.trainable_weights, plain.trainable_weights, strict=True):
        target.assign(source)
    z = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    inference = model.decode(z).mean().numpy()
    # Not training: the same function as the model without dropout, every time.
    np.testing.assert_array_equal(inference, plain.decode(z).mean().numpy())
    np.testing.assert_array_equal(inference, model.decode(z).mean().numpy())
    # Training: units dropped, a fresh draw per call.
    first, second = (model.decode(z, training=True).mean().numpy() for _ in range(2))
    assert np.abs(first - inference).max() > 1e-3
    assert np.abs(first - second).max() > 1e-3


LOAD_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, keras
    from keras_vae import VAE  # registers the serializable classes
    model = keras.saving.load_model(sys.argv[1])
    x, z = np.load(sys.argv[2]), np.load(sys.argv[3])
    params = model.encode_params(x)
    mu, log_var = params["z_mean"], params["z_log_var"]
    np.savez(sys.argv[4], mu=mu.numpy(), log_var=log_var.numpy(),
             decoded=model.decode(z).mean().numpy(),
             iterations=int(model.optimizer.iterations.numpy()))
""")


def test_save_load_in_new_process_is_identical_and_training_continues(digits, tmp_path):
    model = small_vae(likelihood="gaussian", learn_sigma="shared", sigma=0.2)
    model.compile(optimizer=FusedAdam(1e-3))  # a run's optimizer: the file names its class
    model.fit(digits[:256], batch_size=64, epochs=1, verbose=0)
    path = tmp_path / "vae.keras"
    model.save(path)
    x, z = digits[:20], np.random.default_rng(0).normal(size=(20, 4)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "z.npy", z)
    subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_SCRIPT,
            str(path),
            str(tmp_path / "x.npy"),
            str(tmp_path / "z.npy"),
            str(tmp_path / "out.npz"),
        ],
        check=True,
        capture_output=True,
    )
    out = np.load(tmp_path / "out.npz")
    params = model.encode_params(x)
    mu, log_var = params["z_mean"], params["z_log_var"]
    np.testing.assert_array_equal(out["mu"], mu.numpy())
    np.testing.assert_array_equal(out["log_var"], log_var.numpy())
    np.testing.assert_array_equal(out["decoded"], model.decode(z).mean().numpy())
    assert out["iterations"] == 4

    loaded = keras.saving.load_model(path)
    # The sampler's noise stream goes on where it was (Keras does not save it by itself).
    np.testing.assert_array_equal(
        loaded.posterior.sampling.seed_generator.state.numpy(),
        model.posterior.sampling.seed_generator.state.numpy(),
    )
    history = loaded.fit(digits[:256], batch_size=64, epochs=2, verbose=0)
    assert int(loaded.optimizer.iterations.numpy()) == 12  # the optimizer state went on
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_dreg_model_saves_and_resumes_with_its_optimizer_state(digits, tmp_path):
    # DReG computes θ's and φ's gradients separately; the optimizer's slots must still line
    # up with trainable_weights, or a checkpoint restores moments onto the wrong weights.
    model = small_vae(objective="iwae", num_samples=3, gradient_estimator="dreg")
    model.fit(digits[:256], batch_size=64, epochs=1, verbose=0)
    model.save(tmp_path / "vae.keras")
    loaded = keras.saving.load_model(tmp_path / "vae.keras")
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for saved, restored in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(restored.numpy(), saved.numpy())
    history = loaded.fit(digits[:256], batch_size=64, epochs=2, verbose=0)
    assert int(loaded.optimizer.iterations.numpy()) == 12
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.parametrize("architecture", ["mlp", "conv", "made", "pixelcnn_made"])
def test_dreg_splits_the_weights_at_z(digits, architecture):
    # DReG takes φ's gradient back from z alone: every weight z depends on must be on the
    # encoder side, and no other.
    model = small_vae(
        architecture=architecture,
        filters=(4, 4),
        objective="iwae",
        num_samples=2,
        gradient_estimator="dreg",
    )
    encoder_ids = {id(v) for v in model._encoder_side_weights()}
    with tf.GradientTape() as tape:
        terms = model.compute_terms(digits[:8], training=True)
    upstream = tape.gradient(terms["z"], model.trainable_weights)
    for gradient, weight in zip(upstream, model.trainable_weights):
        assert (gradient is not None) == (id(weight) in encoder_ids), weight.path


# --------------------------------------------------------------------------- bad input
def test_wrong_shape_is_refused_with_the_expected_shape(digits):
    model = small_vae()
    with pytest.raises(ValueError, match=r"expects inputs of shape \(batch,\) \+ \(8, 8, 1\)"):
        model.predict(digits.reshape(-1, 64), verbose=0)
    with pytest.raises(ValueError, match="got shape"):
        model.fit(digits[:, :4], epochs=1, verbose=0)


def test_nan_in_a_batch_is_refused(digits):
    model = small_vae(likelihood="gaussian")
    x = digits[:64].copy()
    x[10, 3, 3, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or inf"):
        model.fit(x, batch_size=32, epochs=1, verbose=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or inf"):
        model.encode(x)
    weights = [w.numpy() for w in model.weights]
    assert all(np.all(np.isfinite(w)) for w in weights)


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli"])
def test_data_outside_unit_interval_is_refused(digits, likelihood):
    model = small_vae(likelihood=likelihood)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"needs data in \[0, 1\]"):
        model.evaluate(digits[:32] * 16.0, verbose=0)  # raw 0..16 digit intensities


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"likelihood": "poisson"}, "'likelihood' must be one of .*got 'poisson'"),
        ({"architecture": "resnet"}, "'architecture' must be one of .*got 'resnet'"),
        ({"kl": "exact"}, r"'kl' must be one of \('auto', 'analytic', 'mc'\)"),
        ({"objective": "vimco"}, "'objective' must be one of"),
        ({"gradient_estimator": "vimco"}, "'gradient_estimator' must be one of"),
        ({"gradient_estimator": "dreg"}, "it needs objective 'iwae'"),
        ({"likelihood": "gaussian", "learn_sigma": "per_channel"}, "'learn_sigma' must be one of"),
        ({"likelihood": "gaussian", "sigma": 0.0}, "'sigma' must be finite and > 0"),
        ({"likelihood": "gaussian", "sigma": float("inf")}, "'sigma' must be finite and > 0"),
        ({"beta": float("nan")}, "'beta' must be finite and >= 0"),
        ({"kl_warmup_steps": float("inf")}, "'kl_warmup_steps' must be of type int"),
        ({"latent_dim": 0}, "'latent_dim' must be >= 1"),
        ({"dropout": -0.1}, r"'dropout' must be in \[0, 1\)"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_vae((8, 8, 1), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"objective": "vimco"}, "'objective' must be one of"),
        ({"gradient_estimator": "dreg"}, "it needs objective 'iwae'"),
        ({"latent_dim": 3}, r"the decoder does not take z of shape \(batch, 3\)"),
        ({"likelihood": "poisson"}, "Unknown likelihood 'poisson'"),
        ({"prior": "laplace"}, "Unknown prior 'laplace'"),
    ],
)
def test_the_model_refuses_bad_settings_with_its_own_networks(kwargs, message):
    encoder, decoder = user_networks()
    with pytest.raises(ValueError, match=message):
        VAE(encoder, decoder, **{"latent_dim": 2, **kwargs})


def test_conv_needs_image_shapes_divisible_by_its_strides():
    with pytest.raises(ValueError, match="divisible by 4"):
        make_vae((30, 30, 1), architecture="conv")
    with pytest.raises(ValueError, match="needs image data"):
        make_vae((64,), architecture="conv")
    make_vae((32, 32, 3), architecture="conv")  # CIFAR-shaped data builds


def test_compile_keeps_xla_off_while_inputs_are_checked():
    checked = small_vae()
    assert checked.jit_compile is False
    unchecked = make_vae((8, 8, 1), latent_dim=2, hidden_units=(8,), check_inputs=False)
    unchecked.compile(optimizer="adam", jit_compile=True)
    assert unchecked.jit_compile is True


def test_check_data_names_the_problem(digits):
    model = small_vae()
    with pytest.raises(ValueError, match=r"needs data in \[0, 1\]"):
        model.check_data(digits * 16)
    model.check_data(digits)


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize(
    "name, kwargs, input_shape",
    [
        ("Dense", {"units": 5}, (6400, 3)),  # IWAE's K × batch rows
        (
            "Conv2DTranspose",
            {"filters": 5, "kernel_size": 3, "strides": 2, "padding": "same"},
            (64, 14, 14, 3),
        ),
    ],
)
def test_bias_gradient_is_accurate_in_16_bits(name, kwargs, input_shape, dtype):
    """keras_vae's Dense and Conv2DTranspose give Keras's float32 outputs and gradients, in
    16 bits up to their rounding: the bias gradient sums 6,400 or 64×28×28 = 50,176 values,
    which TensorFlow's BiasAddGrad, summing in bfloat16, would get 90% or more wrong in
    bfloat16, and its Sum would in float16. Linear, so that every tensor differs from float32
    by 16-bit rounding alone (0.5% or less here): with a relu, units near 0 switch, and each
    switch moves ∂loss/∂x by a whole kernel weight (2.0% in bf16 on an AVX2 CPU). On a CPU
    without bfloat16 instructions, TensorFlow's emulated convolution sums its kernel gradient
    in bfloat16 (30% wrong on one thread), which is why ``keras-vae train`` refuses that
    precision there; its outputs, ∂loss/∂x and the bias gradient are still checked."""
    from keras_vae import hardware
    from keras_vae.networks import layers as networks

    ours = getattr(networks, name)(activation="linear", dtype=dtype, **kwargs)
    reference = getattr(keras.layers, name)(activation="linear", dtype="float32", **kwargs)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(size=input_shape), "float32")
    for layer in (ours, reference):
        layer.build(x.shape)
    weights = [rng.normal(size=w.shape) for w in reference.get_weights()]  # a nonzero bias
    results = []
    for layer in (ours, reference):
        layer.set_weights(weights)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.cast(layer(x), "float32")
            loss = tf.reduce_sum(y)  # ∂loss/∂bias = the number of output positions
        results.append([y, *tape.gradient(loss, [x, layer.kernel, layer.bias])])
    emulated = (
        dtype == "mixed_bfloat16" and name == "Conv2DTranspose" and hardware.emulates_bfloat16()
    )
    tolerance = 1e-5 if dtype == "float32" else 1e-2  # relative error of the whole tensor
    for index, (got, want) in enumerate(zip(*results)):
        if emulated and index == 2:  # the kernel gradient
            continue
        assert np.linalg.norm(got - want) <= tolerance * np.linalg.norm(want)
