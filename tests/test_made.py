"""The autoregressive decoders (architectures "made" and "pixelcnn_made"): masks,
normalization, drawing, export."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import make_vae, posterior_params, run_config

from keras_vae import VAE, networks
from keras_vae.export import export_model
from keras_vae.networks.made import MADEDecoder
from keras_vae.networks.pixelcnn_made import PixelCNNMADEDecoder
from keras_vae.settings import ConfigError

AUTOREGRESSIVE = ("made", "pixelcnn_made")
# (architecture, settings) of each decoder variant, the PixelCNN with and without its head.
VARIANTS = {
    "made": ("made", {}),
    "pixelcnn_made": ("pixelcnn_made", {}),
    "pixelcnn_made_head": ("pixelcnn_made", {"pixel_head_units": 3}),
    "pixelcnn_made_head_conv": ("pixelcnn_made", {"pixel_head_units": 3, "pixel_head_layers": 2}),
}

SHAPE = (4, 4, 1)  # D = 16: small enough to sum p(x|z) over all 2^16 binary images


def random_made(architecture="made", **kwargs):
    keras.utils.set_random_seed(0)
    model = make_vae(
        SHAPE,
        latent_dim=3,
        architecture=architecture,
        hidden_units=(12, 9),
        filters=(5, 5, 5),
        activation="tanh",
        seed=0,
        **kwargs,
    )
    # Every weight random, the direct kernel and pixel head too (they start at zero), so
    # that no connection the masks allow is silently absent.
    rng = np.random.default_rng(0)
    for weight in model.decoder.trainable_weights:
        weight.assign(rng.normal(scale=0.5, size=weight.shape).astype("float32"))
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def made(request):
    architecture, settings = VARIANTS[request.param]
    return random_made(architecture, **settings)


def binary(rng, n):
    return (rng.random((n,) + SHAPE) < 0.5).astype("float32")


def numpy_logits(decoder, z, x):
    """ℓ(x, z) of the MADE written from its definition, masks built from the degrees."""
    kernels = [k.numpy().astype("float64") for k in decoder.kernels]
    latent = [k.numpy().astype("float64") for k in decoder.latent_kernels]
    biases = [b.numpy().astype("float64") for b in decoder.biases]
    size = x[0].size
    x = x.reshape(len(x), size).astype("float64")
    inputs = np.arange(1, size + 1)
    degrees = [1 + (np.arange(w.shape[1]) * (size - 1)) // w.shape[1] for w in kernels[:-1]]
    previous, h = inputs, x
    for i, m in enumerate(degrees):
        mask = m[None, :] >= previous[:, None]
        h = np.tanh(h @ (kernels[i] * mask) + z @ latent[i] + biases[i])
        previous = m
    out_mask = inputs[None, :] > previous[:, None]
    direct = decoder.direct_kernel.numpy() * (inputs[None, :] > inputs[:, None])
    logits = h @ (kernels[-1] * out_mask) + x @ direct + z @ latent[-1] + biases[-1]
    if hasattr(decoder, "conv_kernels"):
        features = numpy_pixel_features(decoder, x.reshape((len(x),) + SHAPE[:2]))
        logits = logits + (features @ decoder.pixel_head.numpy()).reshape(len(x), -1)
        if decoder.pixel_head_units:
            z_map = z @ decoder.head_latent_kernel.numpy().astype("float64")
            hidden = np.maximum(
                features @ decoder.head_feature_kernel.numpy()
                + z_map.reshape(features.shape[:3] + (-1,))
                + decoder.head_bias.numpy(),
                0.0,
            )
            for kernel, bias in zip(decoder.head_conv_kernels, decoder.head_conv_biases):
                hidden = hidden + numpy_masked_conv_relu(hidden, kernel, bias, True)
            logits = logits + (hidden @ decoder.head_output.numpy()).reshape(len(x), -1)
    return logits


def numpy_masked_conv_relu(features, kernel, bias, include_center):
    """relu(M ⋆ features + bias), tap by tap: pixel (r, c) reads pixel (r', c') of the
    features if (r', c') comes before it in raster order, or is (r, c) itself where
    ``include_center``."""
    kernel, bias = kernel.numpy().astype("float64"), bias.numpy().astype("float64")
    height, width = features.shape[1:3]
    half = kernel.shape[0] // 2
    out = np.zeros(features.shape[:3] + (kernel.shape[-1],))
    for r, c in itertools.product(range(height), range(width)):
        total = np.zeros((len(features), kernel.shape[-1]))
        for dr, dc in itertools.product(range(-half, half + 1), repeat=2):
            rr, cc = r + dr, c + dc
            before = rr * width + cc < r * width + c or (include_center and (rr, cc) == (r, c))
            if 0 <= rr < height and 0 <= cc < width and before:
                total += features[:, rr, cc] @ kernel[dr + half, dc + half]
        out[:, r, c] = np.maximum(total + bias, 0.0)
    return out


def numpy_pixel_features(decoder, images):
    """g_L(x) of the PixelCNN path: a type-A masked layer, then type-B residual ones."""
    features = images[..., None]
    for i, (kernel, bias) in enumerate(zip(decoder.conv_kernels, decoder.conv_biases)):
        out = numpy_masked_conv_relu(features, kernel, bias, include_center=i > 0)
        features = out if i == 0 else features + out
    return features


def test_logits_match_the_definition(made, rng):
    x, z = binary(rng, 6), rng.normal(size=(6, 3)).astype("float32")
    logits = made.decoder(z, x).numpy().reshape(6, -1)
    np.testing.assert_allclose(logits, numpy_logits(made.decoder, z, x), rtol=1e-4, atol=1e-4)


def test_logit_d_depends_on_x_before_d_and_on_all_of_them(made, rng):
    x, z = binary(rng, 2), rng.normal(size=(5, 2, 3)).astype("float32")
    logits = made.decoder(z, x).numpy().reshape(5, 2, 16)
    for j in range(16):
        flipped = x.reshape(2, 16).copy()
        flipped[:, j] = 1 - flipped[:, j]
        changed = made.decoder(z, flipped.reshape((2,) + SHAPE)).numpy()
        changed = np.abs(changed.reshape(5, 2, 16) - logits).max(axis=(0, 1)) > 0
        np.testing.assert_array_equal(changed, np.arange(16) > j, err_msg=f"flipped x_{j}")


@pytest.mark.parametrize("architecture", AUTOREGRESSIVE)
def test_dropout_keeps_the_autoregressive_order_while_training(architecture, rng):
    model = random_made(architecture, dropout=0.5)
    x = tf.constant(binary(rng, 1))
    z = rng.normal(size=(1, 3)).astype("float32")
    inference = model.decoder(z, x).numpy().reshape(16)
    np.testing.assert_allclose(
        inference, numpy_logits(model.decoder, z, x.numpy())[0], rtol=1e-4, atol=1e-4
    )
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = tf.reshape(model.decoder(z, x, training=True), (16,))
    # ∂ℓ_d/∂x_j of one draw of the dropout masks: zero for j ≥ d, as without dropout.
    jacobian = tape.jacobian(logits, x).numpy().reshape(16, 16)
    np.testing.assert_array_equal(jacobian[np.triu_indices(16)], 0.0)
    assert np.abs(jacobian[np.tril_indices(16, -1)]).max() > 0
    assert np.abs(logits.numpy() - inference).max() > 1e-3  # units were dropped


def test_the_hidden_path_alone_carries_x1_to_every_later_logit(rng):
    model = random_made()
    model.decoder.direct_kernel.assign(np.zeros((16, 16), "float32"))
    x, z = binary(rng, 2), rng.normal(size=(2, 3)).astype("float32")
    flipped = x.copy().reshape(2, 16)
    flipped[:, 0] = 1 - flipped[:, 0]
    before = model.decoder(z, x).numpy().reshape(2, 16)
    after = model.decoder(z, flipped.reshape((2,) + SHAPE)).numpy().reshape(2, 16)
    changed = np.abs(after - before).max(axis=0) > 0
    np.testing.assert_array_equal(changed, np.arange(16) > 0)


def test_p_x_given_z_sums_to_one_over_all_binary_images(made, rng):
    every_x = np.array(list(itertools.product([0.0, 1.0], repeat=16)), "float32")
    every_x = every_x.reshape((-1,) + SHAPE)
    for z in rng.normal(size=(2, 3)).astype("float32"):
        z = np.broadcast_to(z, (len(every_x), 3))
        log_p = made.decode(z, every_x).log_prob(every_x).numpy().astype("float64")
        np.testing.assert_allclose(np.exp(log_p).sum(), 1.0, rtol=1e-5)


def test_k_samples_share_the_x_terms(made, rng):
    # z of shape [K, n, d] against x of shape [n, ...] equals K separate decodes.
    x, z = binary(rng, 3), rng.normal(size=(4, 3, 3)).astype("float32")
    together = made.decode(z, x).log_prob(x).numpy()
    apart = np.stack([made.decode(z_k, x).log_prob(x).numpy() for z_k in z])
    np.testing.assert_allclose(together, apart, rtol=1e-6)


def test_sample_takes_an_int_or_a_stateless_seed_pair(made):
    np.testing.assert_array_equal(made.sample(2, seed=3), made.sample(2, seed=3))
    pair = made.sample(2, seed=(3, 4))
    np.testing.assert_array_equal(pair, made.sample(2, seed=(3, 4)))
    assert pair.shape == (2,) + SHAPE and np.abs(pair - made.sample(2, seed=3)).max() > 0


def test_drawn_images_follow_their_own_conditionals(made, rng):
    z = rng.normal(size=(8, 3)).astype("float32")
    noise = rng.random((8,) + SHAPE).astype("float32")
    drawn = made.decode(z, noise=noise)
    # x_d = 1[u_d < p(x_d = 1 | x_<d, z)], the conditionals recomputed on the drawn x.
    x = (noise < drawn.mean().numpy()).astype("float32")
    np.testing.assert_array_equal(drawn.mean().numpy(), made.decode(z, x).mean().numpy())
    greedy = made.decode(z).mean().numpy()
    np.testing.assert_array_equal(
        greedy, made.decode(z, (greedy > 0.5).astype("float32")).mean().numpy()
    )
    z = tf.random.stateless_normal((5, 3), seed=[2, 0])
    noise = tf.random.stateless_uniform((5,) + SHAPE, seed=[2, 1])
    np.testing.assert_array_equal(
        made.sample(5, seed=2).numpy(), made.decode(z, noise=noise).mean().numpy()
    )
    with pytest.raises(ValueError, match=r"takes z of shape \(n, 3\); got shape \(2, 8, 3\)"):
        made.decode(tf.zeros((2, 8, 3)))


def test_log_weights_are_the_bernoulli_log_likelihood_of_the_logits(made, rng):
    x, epsilon = binary(rng, 7), rng.normal(size=(4, 7, 3)).astype("float32")
    log_px_z, log_pz, _, _ = made.log_weights(x, epsilon=epsilon)
    mu, log_var = (t.numpy().astype("float64") for t in posterior_params(made, x))
    z = mu + np.exp(0.5 * log_var) * epsilon
    flat = x.reshape(7, 16).astype("float64")
    for k in range(4):
        logits = numpy_logits(made.decoder, z[k], x)
        expected = np.sum(flat * logits - np.logaddexp(0, logits), axis=1)
        np.testing.assert_allclose(log_px_z.numpy()[k], expected, rtol=1e-4)
    np.testing.assert_allclose(
        log_pz.numpy(), -0.5 * np.sum(z**2 + np.log(2 * np.pi), -1), rtol=1e-5
    )


@pytest.mark.parametrize(
    "variant, dropout",
    [
        ("made", 0.0),
        ("made", 0.3),
        ("pixelcnn_made", 0.3),
        ("pixelcnn_made_head", 0.0),
        ("pixelcnn_made_head_conv", 0.0),
    ],
)
def test_keras_file_round_trip(variant, dropout, rng, tmp_path):
    architecture, settings = VARIANTS[variant]
    made = random_made(architecture, dropout=dropout, **settings)
    made.save(tmp_path / "made.keras")
    loaded = keras.saving.load_model(tmp_path / "made.keras")
    x, epsilon = binary(rng, 5), rng.normal(size=(3, 5, 3)).astype("float32")
    for got, want in zip(
        loaded.log_weights(x, epsilon=epsilon), made.log_weights(x, epsilon=epsilon)
    ):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    np.testing.assert_array_equal(loaded.sample(4, seed=5), made.sample(4, seed=5))


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("architecture", AUTOREGRESSIVE)
def test_mixed_precision_trains_with_float32_logits(architecture, precision, rng):
    model = make_vae(
        SHAPE,
        latent_dim=3,
        architecture=architecture,
        hidden_units=(8,),
        filters=(4, 4),
        dropout=0.3,
        dtype=precision,
        seed=0,
    )
    model.compile(optimizer="adam")
    history = model.fit(binary(rng, 64), batch_size=32, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert model.decoder(tf.zeros((2, 3)), binary(rng, 2)).dtype == "float32"


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("architecture", AUTOREGRESSIVE)
def test_bias_gradients_are_accurate_in_16_bits(architecture, precision, rng):
    """The decoder's bias gradients under a 16-bit policy match float32's, with the same
    weights, to 16-bit rounding: each sums 50 × 64 rows, the PixelCNN's 64 × 28 × 28 and its
    head's (and head layer's) 50 × 64 × 28 × 28, which float16's CPU Sum (the gradient of a plain ``+ bias``)
    got up to 63% wrong."""
    shape, latent_dim = (28, 28, 1), 4
    x = tf.constant(rng.random((64,) + shape) < 0.3, "float32")
    z = tf.constant(rng.normal(size=(50, 64, latent_dim)), "float32")
    if architecture == "made":
        decoders = [
            MADEDecoder(shape, latent_dim, hidden_units=(32,), dtype=dtype)
            for dtype in ("float32", precision)
        ]
    else:
        decoders = [
            PixelCNNMADEDecoder(
                shape,
                latent_dim,
                hidden_units=(32,),
                filters=(8, 8),
                pixel_head_units=4,
                pixel_head_layers=1,
                dtype=dtype,
            )
            for dtype in ("float32", precision)
        ]
    gradients = []
    for decoder in decoders:
        decoder(z, x)
        if not gradients:
            weights = [rng.normal(scale=0.1, size=w.shape) for w in decoder.get_weights()]
        decoder.set_weights(weights)
        with tf.GradientTape() as tape:
            # As the loss's scale: a sum over pixels, a mean over samples and examples.
            loss = tf.reduce_sum(decoder(z, x)) / (50 * 64)
        biases = [w for w in decoder.trainable_weights if "bias" in w.name]
        gradients.append(dict(zip([w.name for w in biases], tape.gradient(loss, biases))))
    assert len(gradients[0]) == (6 if architecture == "pixelcnn_made" else 2)
    for name, want in gradients[0].items():
        got = gradients[1][name]
        assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want), name


def test_export_serves_the_models_outputs(made, rng, tmp_path):
    path = export_model(made, tmp_path, "made")
    served = tf.saved_model.load(str(path)).signatures
    x, z = binary(rng, 4), rng.normal(size=(4, 3)).astype("float32")
    np.testing.assert_allclose(
        served["serving_default"](x=x)["reconstruction"].numpy(),
        made.reconstruct(x).numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
    decoded = served["decode"](z=z)
    np.testing.assert_allclose(
        decoded["mean"].numpy(), made.decode(z).mean().numpy(), rtol=1e-5, atol=1e-6
    )
    seeds = np.array([3, 7], "int64")
    sample = served["sample"](seed=seeds)
    noise = np.stack([tf.random.stateless_uniform(SHAPE, seed=[s, 1]).numpy() for s in seeds])
    np.testing.assert_allclose(
        sample["mean"].numpy(),
        made.decode(sample["z"], noise=noise).mean().numpy(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_made_needs_binary_data_and_a_hidden_layer():
    encoder, decoder = networks.build("made", SHAPE, 3, hidden_units=(8,))
    with pytest.raises(ValueError, match="likelihood='bernoulli'"):
        VAE(encoder, decoder, latent_dim=3, likelihood="gaussian")
    with pytest.raises(ValueError, match="'hidden_units' needs at least one width"):
        make_vae(SHAPE, architecture="made", hidden_units=())
    with pytest.raises(ValueError, match="needs at least one hidden layer"):
        MADEDecoder(SHAPE, 3, hidden_units=())
    with pytest.raises(ConfigError, match="'likelihood' must be 'bernoulli'"):
        run_config(architecture="made", likelihood="gaussian")
    with pytest.raises(ConfigError, match="'binarize' must binarize the data"):
        run_config(architecture="made", binarize="none")
    with pytest.raises(
        ConfigError, match="'likelihood' must be 'bernoulli' for architecture 'pixelcnn_made'"
    ):
        run_config(architecture="pixelcnn_made", filters=(4, 4), likelihood="gaussian")
    with pytest.raises(ConfigError, match="'filters' must be equal widths"):
        run_config(architecture="pixelcnn_made", filters=(32, 64))
    with pytest.raises(
        ConfigError, match="'pixel_head_units' applies only to architecture 'pixelcnn_made'"
    ):
        run_config(architecture="made", pixel_head_units=4)


def test_pixelcnn_made_needs_single_channel_images_and_equal_widths():
    with pytest.raises(ValueError, match=r"shape \(height, width, 1\); got data_shape=\(4, 4, 3\)"):
        make_vae((4, 4, 3), architecture="pixelcnn_made", filters=(4, 4))
    with pytest.raises(ValueError, match=r"'filters' must be equal widths .*got \(4, 8\)"):
        make_vae(SHAPE, architecture="pixelcnn_made", filters=(4, 8))
    with pytest.raises(ValueError, match=r"equal convolution widths .*got filters=\(4, 8\)"):
        PixelCNNMADEDecoder(SHAPE, 3, filters=(4, 8))
    with pytest.raises(ConfigError, match="'pixel_head_layers' needs a pixel head"):
        run_config(architecture="pixelcnn_made", filters=(4, 4), pixel_head_layers=1)
    with pytest.raises(ValueError, match="pixel_head_layers=1 needs a pixel head"):
        PixelCNNMADEDecoder(SHAPE, 3, filters=(4, 4), pixel_head_layers=1)


def test_traversals_of_an_autoregressive_decoder_share_one_noise(tmp_path, monkeypatch):
    from keras_vae import plots, report

    model = make_vae(SHAPE, architecture="made", hidden_units=(16,), latent_dim=2, seed=0)
    drawn = {}
    monkeypatch.setattr(
        plots, "latent_traversals", lambda decode, z, dims, path: drawn.update(decode=decode)
    )
    x = (np.random.default_rng(0).uniform(size=(8, *SHAPE)) > 0.5).astype("float32")
    history = {"loss": [1.0], "reconstruction_loss": [0.9], "kl_loss": [0.1]}
    report.write_plots(model, tmp_path, history, x, None, seed=3)
    z = np.random.default_rng(1).normal(size=(4, 2)).astype("float32")
    noise = np.random.default_rng(3).uniform(size=(4, *SHAPE)).astype("float32")
    expected = model.decode(z, noise=noise).mean().numpy()
    np.testing.assert_allclose(drawn["decode"](z), expected, rtol=1e-6)
