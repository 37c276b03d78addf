"""Layers shared by the network families: ``Dense`` and ``Conv2DTranspose`` whose bias
gradient is accurate in bfloat16, the ``GatedDense`` layer and its ``gate``, and the
decoder's ``dropout`` layers."""

import keras
import tensorflow as tf
from keras import ops

from keras_vae.sampling import Dropout


def add_bias(x, bias):
    """x + bias, with an accurate bias gradient also in bfloat16.

    Keras's ``ops.add`` of a bias becomes TensorFlow's ``BiasAdd``, whose CPU gradient
    ``BiasAddGrad`` sums a bfloat16 gradient in bfloat16, which stalls over large batches
    (docs/benchmarks.md); in bfloat16 ``tf.add``'s gradient, a ``Sum``, accumulates in
    float32. Other dtypes keep ``BiasAdd``: float32's fuses with the matmul or convolution
    before it, and float16's ``BiasAddGrad`` is accurate where its ``Sum`` is not.
    """
    if x.dtype == tf.bfloat16:
        return tf.add(x, tf.cast(bias, x.dtype))
    return ops.add(x, bias)


@keras.saving.register_keras_serializable(package="keras_vae")
class Dense(keras.layers.Dense):
    """``keras.layers.Dense`` whose bias gradient is accurate in bfloat16 (``add_bias``)."""

    def call(self, inputs, training=None):
        x = ops.matmul(inputs, self.kernel)
        if self.bias is not None:
            x = add_bias(x, self.bias)
        return x if self.activation is None else self.activation(x)


def gate(h, units, activation):
    """a(h[..., :units]) ⊙ sigmoid(h[..., units:]): the gated units of pre-activations h
    [..., 2·units] (``GatedDense``, the hierarchy's gated layers)."""
    return activation(h[..., :units]) * ops.sigmoid(h[..., units:])


@keras.saving.register_keras_serializable(package="keras_vae")
class GatedDense(keras.layers.Layer):
    """h = a(W x + b) ⊙ sigmoid(V x + c), the gated layer of the VampPrior paper's networks
    (after Dauphin et al., 2017), a the ``activation`` (default linear). W and V are one
    ``Dense`` of 2·units, so each layer is one matmul."""

    def __init__(self, units, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.activation = keras.activations.get(activation)
        self.dense = Dense(2 * self.units, dtype=self.dtype_policy, name="dense")

    def build(self, input_shape):
        self.dense.build(input_shape)
        self.built = True

    def call(self, inputs):
        return gate(self.dense(inputs), self.units, self.activation)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "activation": keras.activations.serialize(self.activation),
        }


@keras.saving.register_keras_serializable(package="keras_vae")
class Conv2DTranspose(keras.layers.Conv2DTranspose):
    """``keras.layers.Conv2DTranspose`` (channels last) whose bias gradient is accurate in
    bfloat16 (``add_bias``)."""

    def call(self, inputs):
        if not self.use_bias or self.data_format != "channels_last":
            return super().call(inputs)
        outputs = ops.conv_transpose(
            inputs,
            self.kernel,
            strides=list(self.strides),
            padding=self.padding,
            output_padding=self.output_padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        outputs = add_bias(outputs, self.bias)
        return outputs if self.activation is None else self.activation(outputs)


def dropout_layers(rate, seed, index, dtype):
    """The dropout after decoder hidden layer ``index``: none at rate 0, so that a model
    without dropout has no dropout layers. Its seed is offset by
    the layer, so that equal-width layers do not drop the same units."""
    return (
        [Dropout(rate, seed=None if seed is None else seed + 1 + index, dtype=dtype)]
        if rate
        else []
    )
