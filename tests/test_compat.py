"""The Keras internals keras-vae leans on (keras_vae/compat.py): each test fails when a Keras
upgrade changes what the compatibility code assumes."""

import warnings

import keras
import numpy as np
import pytest

from keras_vae import compat


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_slots_are_the_moments_keras_adam_updates(amsgrad):
    variable = keras.Variable(np.array([1.0, -2.0], "float32"))
    optimizer = keras.optimizers.Adam(0.1, amsgrad=amsgrad)
    gradient = np.array([0.5, -0.25], "float32")
    optimizer.apply_gradients([(keras.ops.convert_to_tensor(gradient), variable)])
    m, v, v_hat = compat.adam_slots(optimizer, variable)
    b1, b2 = optimizer.beta_1, optimizer.beta_2
    np.testing.assert_allclose(m.numpy(), (1 - b1) * gradient, rtol=1e-6)
    np.testing.assert_allclose(v.numpy(), (1 - b2) * gradient**2, rtol=1e-6)
    if amsgrad:
        np.testing.assert_allclose(v_hat.numpy(), v.numpy(), rtol=1e-6)
    else:
        assert v_hat is None


class OwnCompile(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)


def test_keras_still_skips_compile_from_config_for_models_with_their_own_compile():
    # What compat.compile_from_config exists for; when Keras stops skipping, remove it.
    model = OwnCompile()
    model(np.zeros((1, 2), "float32"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keras.Model.compile_from_config(model, {"optimizer": "adam", "loss": "mse"})
    assert any("compile()` was not called" in str(w.message) for w in caught)
    assert not model.compiled


def test_compile_from_config_compiles_and_builds_the_optimizer():
    model = OwnCompile()
    model(np.zeros((1, 2), "float32"))
    compat.compile_from_config(
        model, {"optimizer": keras.optimizers.serialize(keras.optimizers.Adam(0.01)), "loss": "mse"}
    )
    assert model.compiled and model.optimizer.built
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)
