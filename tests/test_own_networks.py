"""A VAE of the user's own keras.Sequential encoder and decoder: trains, saves and reloads
as .keras, evaluates, and exports with every signature reproducing the in-memory model."""

import keras
import numpy as np
import tensorflow as tf
from helpers import Scale, user_networks
from test_export import expected_outputs, inputs_for

from keras_vae import VAE, FusedAdam, StandardNormal
from keras_vae.evaluate import evaluate
from keras_vae.export import SERVING_SIGNATURES, export_model
from keras_vae.likelihoods import BernoulliLikelihood


def test_own_networks_train_save_reload_evaluate_and_export(digits, tmp_path):
    keras.utils.set_random_seed(0)
    encoder, decoder = user_networks(latent_dim=2)
    model = VAE(
        encoder,
        decoder,
        latent_dim=2,
        likelihood=BernoulliLikelihood(),
        prior=StandardNormal(),
        seed=0,
    )
    assert model.data_shape == (8, 8, 1)  # read from the encoder's Input
    assert model.encoder is encoder and model.decoder is decoder
    model.compile(optimizer=FusedAdam(3e-3))
    train, test = digits[:1500], digits[1500:]
    before = model.evaluate(test, verbose=0, return_dict=True)
    model.fit(train, epochs=6, batch_size=64, verbose=0)
    after = model.evaluate(test, verbose=0, return_dict=True)
    assert after["loss"] < before["loss"] - 5, (before, after)
    # The user's own layers train with the rest.
    scales = [
        layer.s for net in (encoder, decoder) for layer in net.layers if isinstance(layer, Scale)
    ]
    assert len(scales) == 2 and all(float(s) != 1.0 for s in scales)

    path = tmp_path / "own.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.encoder, keras.Sequential) and loaded.encoder.name == "my_encoder"
    for source, copy in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(source.numpy(), copy.numpy())
    x = test[:16]
    np.testing.assert_array_equal(loaded.reconstruct(x), model.reconstruct(x))
    np.testing.assert_array_equal(loaded.elbo(x, seed=3), model.elbo(x, seed=3))
    np.testing.assert_array_equal(loaded.sample(4, seed=1), model.sample(4, seed=1))
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations)
    loaded.fit(train[:128], epochs=1, batch_size=64, verbose=0)  # training continues

    report, _ = evaluate(model, test, num_samples=20, seed=0)
    assert report["log_px"]["mean"] >= report["elbo"]["mean"] - 3 * report["gap"]["se"]
    assert report["bits_per_dim"] is not None

    version = export_model(model, tmp_path / "saved_models", "own")
    served = tf.saved_model.load(str(version))
    assert set(served.signatures) == set(SERVING_SIGNATURES)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 2)).astype("float32")
    seeds = np.array([3, 7, 3], "int64")
    expected = expected_outputs(model, x, z, seeds)
    for signature in SERVING_SIGNATURES:
        inputs = {k: tf.constant(v) for k, v in inputs_for(signature, x, z, seeds).items()}
        outputs = served.signatures[signature](**inputs)
        assert set(outputs) == set(expected[signature]), signature
        for key, value in expected[signature].items():
            np.testing.assert_allclose(
                outputs[key].numpy(), value, rtol=1e-5, atol=1e-5, err_msg=f"{signature}/{key}"
            )
