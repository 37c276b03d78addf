"""The places where keras-vae leans on Keras internals, gathered in one module; each has a
test in tests/test_compat.py that fails on a Keras upgrade that changes it."""

import keras


def adam_slots(optimizer, variable):
    """(m, v, v̂ or None): the slot variables that ``keras.optimizers.Adam`` keeps for
    ``variable`` (first and second moments, and the AMSGrad maximum). Keras has no public
    accessor for them."""
    index = optimizer._get_variable_index(variable)
    hat = optimizer._velocity_hats[index] if optimizer.amsgrad else None
    return optimizer._momentums[index], optimizer._velocities[index], hat


def compile_from_config(model, config):
    """What ``keras.Model.compile_from_config`` does, for a model that overrides
    ``compile``: Keras skips models with their own ``compile`` when it loads them, which
    would leave a reloaded model without its optimizer state."""
    model.compile(**keras.saving.deserialize_keras_object(config))
    if model.built:
        model.optimizer.build(model.trainable_variables)
