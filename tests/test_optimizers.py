"""FusedAdam makes the same updates as keras.optimizers.Adam."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import make_vae, run_config

from keras_vae import FusedAdam
from keras_vae.fitting import compile_model


def _train(optimizer, initial, gradients, wrap=None):
    """The weights and optimizer variables after applying ``gradients`` step by step, and
    the op types of the traced step."""
    variables = [keras.Variable(w) for w in initial]
    stepper = wrap(optimizer) if wrap else optimizer
    step = tf.function(lambda grads: stepper.apply_gradients(zip(grads, variables)))
    for grads in gradients:
        step(grads)
    graph = step.get_concrete_function(gradients[0]).graph.as_graph_def()
    ops = {node.op for node in graph.node}  # and in branch functions (LossScaleOptimizer)
    ops |= {node.op for function in graph.library.function for node in function.node_def}
    return [v.numpy() for v in variables + optimizer.variables], ops


SCHEDULE = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=5, decay_rate=0.5)


@pytest.mark.parametrize(
    "kwargs, wrap",
    [
        ({}, None),
        ({"weight_decay": 0.1}, None),
        ({"clipnorm": 1.0}, None),
        ({"global_clipnorm": 0.5}, None),
        ({"learning_rate": SCHEDULE}, None),
        ({}, keras.optimizers.LossScaleOptimizer),  # as under mixed_float16
        ({"amsgrad": True}, None),
    ],
)
def test_fused_adam_matches_keras_adam(kwargs, wrap):
    rng = np.random.default_rng(0)
    initial = [rng.normal(size=shape).astype("float32") for shape in [(30, 7), (7,)]]
    gradients = [[rng.normal(size=w.shape).astype("float32") for w in initial] for _ in range(25)]
    kwargs = {"learning_rate": 0.01, **kwargs}
    expected, _ = _train(keras.optimizers.Adam(**kwargs), initial, gradients, wrap)
    got, ops = _train(FusedAdam(**kwargs), initial, gradients, wrap)
    # The fused kernel really ran.
    kernel = "ResourceApplyAdamWithAmsgrad" if kwargs.get("amsgrad") else "ResourceApplyAdam"
    assert kernel in ops
    assert len(got) == len(expected)  # weights, iterations, learning rate, m, v (and v̂)
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


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_gradient_clipnorm_bounds_the_global_norm_of_each_step(digits, name):
    model = make_vae((8, 8, 1), latent_dim=2, hidden_units=(16,), seed=0)
    training = run_config(optimizer=name, learning_rate=1.0, gradient_clipnorm=0.01).training
    compile_model(model, training)
    assert model.optimizer.global_clipnorm == 0.01
    before = [w.numpy() for w in model.trainable_weights]
    model.fit(digits[:32], batch_size=32, epochs=1, verbose=0)
    step = np.sqrt(
        sum(np.sum((w.numpy() - b) ** 2) for w, b in zip(model.trainable_weights, before))
    )
    if name == "sgd":  # θ ← θ − η g/max(1, ‖g‖/c): a step of exactly η c, as ‖g‖ > c here
        assert step == pytest.approx(0.01, rel=1e-4)
    else:  # Adam's first step is ±η per weight whatever the gradient's scale
        assert step > 1
