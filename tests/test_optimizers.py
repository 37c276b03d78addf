"""FusedAdam makes the same updates as keras.optimizers.Adam."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vae import FusedAdam


def _train(optimizer, initial, gradients):
    variables = [keras.Variable(w) for w in initial]
    step = tf.function(lambda grads: optimizer.apply_gradients(zip(grads, variables)))
    for grads in gradients:
        step(grads)
    return [v.numpy() for v in variables + optimizer.variables]


@pytest.mark.parametrize("kwargs", [{}, {"amsgrad": True}, {"weight_decay": 0.1},
                                    {"clipnorm": 1.0}])
def test_fused_adam_matches_keras_adam(kwargs):
    rng = np.random.default_rng(0)
    initial = [rng.normal(size=shape).astype("float32") for shape in [(30, 7), (7,)]]
    gradients = [[rng.normal(size=w.shape).astype("float32") for w in initial]
                 for _ in range(25)]
    expected = _train(keras.optimizers.Adam(0.01, **kwargs), initial, gradients)
    got = _train(FusedAdam(0.01, **kwargs), initial, gradients)
    assert len(got) == len(expected)  # weights, iterations, learning rate, m and v per weight
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The weights moved (25 steps of at most about 0.01, random directions), so the
    # comparison above is not between two unchanged copies.
    assert np.abs(got[0] - initial[0]).mean() > 0.02


def test_fused_adam_round_trips_through_its_config():
    optimizer = FusedAdam(3e-4, beta_1=0.8, epsilon=1e-5)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is FusedAdam
    assert restored.get_config() == optimizer.get_config()
