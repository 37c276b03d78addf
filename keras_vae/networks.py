"""Encoder and decoder networks, by family name.

An encoder network maps x ∈ R^{data_shape} to a feature vector; the VAE puts the two
linear heads μ_φ(x) and log σ²_φ(x) on top of it. A decoder network maps z ∈ R^d to the
likelihood's parameters, one per data element (shape ``data_shape``): Bernoulli logits or
the Gaussian mean μ_θ(z). The autoregressive decoder (``made``) also reads x: the
parameter of element x_d is a function of z and of the elements before it, x_<d;
``pixelcnn_made`` adds masked convolutions of x_<d (a PixelCNN) to it.
"""

import itertools
import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_vae.sampling import Dropout

ARCHITECTURES = ("mlp", "conv", "made", "pixelcnn_made")
AUTOREGRESSIVE = ("made", "pixelcnn_made")  # decoders of x_d that read x_<d


def mlp_encoder(data_shape, hidden_units=(512, 256), activation="relu", dtype=None):
    """x → flatten → Dense(h₁) → … → Dense(h_n)."""
    layers = [keras.Input(shape=data_shape), keras.layers.Flatten(dtype=dtype)]
    layers += [Dense(units, activation=activation, dtype=dtype) for units in hidden_units]
    return keras.Sequential(layers, name="encoder_network")


def _dropout(rate, seed, index, dtype):
    """The dropout after decoder hidden layer ``index``: none at rate 0, so that a model
    without dropout has the same layers (and weights file) as before. Its seed is offset by
    the layer, so that equal-width layers do not drop the same units."""
    return [Dropout(rate, seed=None if seed is None else seed + 1 + index, dtype=dtype)
            ] if rate else []


def mlp_decoder(data_shape, latent_dim, hidden_units=(512, 256), activation="relu", dtype=None,
                dropout=0.0, seed=None, output_dtype=None):
    """z → Dense(h_n) → … → Dense(h₁) → Dense(prod(data_shape)) → reshape (mirror of the
    encoder); ``dropout`` after each hidden layer while training. The output layer computes
    in ``output_dtype`` (default: ``dtype``)."""
    layers = [keras.Input(shape=(latent_dim,))]
    for i, units in enumerate(reversed(hidden_units)):
        layers.append(Dense(units, activation=activation, dtype=dtype))
        layers += _dropout(dropout, seed, i, dtype)
    layers += [
        Dense(math.prod(data_shape), dtype=output_dtype or dtype),
        keras.layers.Reshape(data_shape, dtype=output_dtype or dtype),
    ]
    return keras.Sequential(layers, name="decoder_network")


def _check_image_shape(data_shape, filters):
    if len(data_shape) != 3:
        raise ValueError(
            f"The 'conv' architecture needs image data of shape (height, width, channels); "
            f"got data_shape={tuple(data_shape)}. Use architecture='mlp' for flat data."
        )
    factor = 2 ** len(filters)
    height, width, _ = data_shape
    if height % factor or width % factor:
        raise ValueError(
            f"The 'conv' architecture halves height and width {len(filters)} times "
            f"(filters={tuple(filters)}), so both must be divisible by {factor}; "
            f"got data_shape={tuple(data_shape)}."
        )


def conv_encoder(data_shape, filters=(32, 64), hidden_units=(16,), activation="relu",
                 dtype=None):
    """x → Conv2D(f, 3, stride 2) for each f → flatten → Dense(h) for each h.

    With the defaults this is the encoder of the official Keras VAE example.
    """
    _check_image_shape(data_shape, filters)
    layers = [keras.Input(shape=data_shape)]
    layers += [
        keras.layers.Conv2D(f, 3, strides=2, padding="same", activation=activation,
                            dtype=dtype)
        for f in filters
    ]
    layers.append(keras.layers.Flatten(dtype=dtype))
    layers += [Dense(units, activation=activation, dtype=dtype) for units in hidden_units]
    return keras.Sequential(layers, name="encoder_network")


def _add_bias(x, bias):
    """x + bias, with an accurate bias gradient also in bfloat16.

    Keras's ``ops.add`` of a bias becomes TensorFlow's ``BiasAdd``, whose CPU gradient
    ``BiasAddGrad`` sums a bfloat16 gradient in bfloat16: over 128×28×28 values of about
    0.5 the sum stops at 512 (float32: 50,166), and a bf16 conv VAE's transposed
    convolutions got bias gradients 81–97% off. In bfloat16 ``tf.add``'s gradient, a
    ``Sum``, accumulates in float32, and is also about 3× faster. Other dtypes keep
    ``BiasAdd``: float32's fuses with the matmul or convolution before it, and float16's
    ``BiasAddGrad`` is accurate where its ``Sum`` is not (it stops at 8,192 there).
    """
    if x.dtype == tf.bfloat16:
        return tf.add(x, tf.cast(bias, x.dtype))
    return ops.add(x, bias)


@keras.saving.register_keras_serializable(package="keras_vae")
class Dense(keras.layers.Dense):
    """``keras.layers.Dense`` whose bias gradient is accurate in bfloat16 (``_add_bias``)."""

    def call(self, inputs, training=None):
        x = ops.matmul(inputs, self.kernel)
        if self.bias is not None:
            x = _add_bias(x, self.bias)
        return x if self.activation is None else self.activation(x)


@keras.saving.register_keras_serializable(package="keras_vae")
class Conv2DTranspose(keras.layers.Conv2DTranspose):
    """``keras.layers.Conv2DTranspose`` (channels last) whose bias gradient is accurate in
    bfloat16 (``_add_bias``)."""

    def call(self, inputs):
        if not self.use_bias or self.data_format != "channels_last":
            return super().call(inputs)
        outputs = ops.conv_transpose(
            inputs, self.kernel, strides=list(self.strides), padding=self.padding,
            output_padding=self.output_padding, dilation_rate=self.dilation_rate,
            data_format=self.data_format)
        outputs = _add_bias(outputs, self.bias)
        return outputs if self.activation is None else self.activation(outputs)


def conv_decoder(data_shape, latent_dim, filters=(32, 64), activation="relu", dtype=None,
                 dropout=0.0, seed=None, output_dtype=None):
    """z → Dense → reshape to (H/2ⁿ, W/2ⁿ, f_n) → Conv2DTranspose(f, 3, stride 2) for f in
    reversed(filters) → Conv2DTranspose(channels, 3) (linear: logits or means);
    ``dropout`` after each hidden layer while training; the output layer computes in
    ``output_dtype`` (default: ``dtype``).

    With the defaults this is the decoder of the official Keras VAE example.
    """
    _check_image_shape(data_shape, filters)
    factor = 2 ** len(filters)
    height, width, channels = data_shape
    start = (height // factor, width // factor, filters[-1])
    layers = [
        keras.Input(shape=(latent_dim,)),
        Dense(math.prod(start), activation=activation, dtype=dtype),
        *_dropout(dropout, seed, 0, dtype),
        keras.layers.Reshape(start, dtype=dtype),
    ]
    for i, f in enumerate(reversed(filters), start=1):
        layers.append(Conv2DTranspose(f, 3, strides=2, padding="same", activation=activation,
                                      dtype=dtype))
        layers += _dropout(dropout, seed, i, dtype)
    layers.append(Conv2DTranspose(channels, 3, padding="same", dtype=output_dtype or dtype))
    return keras.Sequential(layers, name="decoder_network")


def made_degrees(count, data_size):
    """MADE degrees m_k ∈ [1, D−1] of ``count`` hidden units, spread evenly: unit k may see
    x_j for j ≤ m_k."""
    return 1 + (np.arange(count) * (data_size - 1)) // count


@keras.saving.register_keras_serializable(package="keras_vae")
class MADEDecoder(keras.layers.Layer):
    """Bernoulli logits ℓ_d(x_<d, z) of an autoregressive p_θ(x|z) = Π_d p(x_d | x_<d, z),
    x flattened in raster order (d = 1..D), by a MADE (Germain et al., 2015) that z
    enters at every layer:

        h₁ = a(M₁⊙W₁ x + V₁ z + b₁),   h_l = a(M_l⊙W_l h_{l−1} + V_l z + b_l),
        ℓ  = M_o⊙W_o h_L + M_x⊙A x + V_o z + b_o.

    Hidden unit k of every layer has degree m_k (``made_degrees``). The masks keep the
    connections x_j → unit k with j ≤ m_k, unit k → unit k' with m_k ≤ m_k', unit k →
    output d with m_k < d and, in the direct term A, x_j → output d with j < d; so ℓ_d
    depends on x_<d only, and p_θ(x|z) is normalized.

    ``call(z, x)`` takes z of shape [..., n, d] and x of shape [n, *data_shape] and returns
    logits [..., n, *data_shape]; the two terms that read x (W₁ x and A x) are computed
    once per example and shared by every z of that example. ``dropout`` drops hidden units
    h_l while training (masks drawn per example and sample); the masks M keep the
    autoregressive property for any dropped set.
    """

    def __init__(self, data_shape, latent_dim, hidden_units=(500, 500), activation="tanh",
                 dropout=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.data_shape = tuple(int(n) for n in data_shape)
        self.latent_dim = int(latent_dim)
        self.hidden_units = tuple(int(n) for n in hidden_units)
        self.activation = keras.activations.get(activation)
        self.activation_name = activation
        self.dropout = float(dropout)
        self.seed = seed
        # One Dropout per hidden layer, owned by this layer (its SeedGenerator with it).
        self.dropouts = [layer for i in range(len(self.hidden_units))
                         for layer in _dropout(self.dropout, seed, i, self.dtype_policy)]
        if not self.hidden_units:
            raise ValueError("MADEDecoder needs at least one hidden layer; got hidden_units=().")
        size = math.prod(self.data_shape)
        # The degrees fix the masks; the masks themselves (D×H floats each) are built in
        # call(), so that traced graphs and SavedModels hold the degrees, not the masks.
        self._degrees = [np.arange(1, size + 1, dtype="int32")]
        self._degrees += [made_degrees(units, size).astype("int32")
                          for units in self.hidden_units]

    def build(self, z_shape=None, x_shape=None):
        size = math.prod(self.data_shape)
        widths = (size,) + self.hidden_units + (size,)
        self.kernels, self.latent_kernels, self.biases = [], [], []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            self.kernels.append(self.add_weight(
                (fan_in, fan_out), initializer="glorot_uniform", name=f"kernel_{i}"))
            self.latent_kernels.append(self.add_weight(
                (self.latent_dim, fan_out), initializer="glorot_uniform",
                name=f"latent_kernel_{i}"))
            self.biases.append(self.add_weight((fan_out,), initializer="zeros",
                                               name=f"bias_{i}"))
        # Zero at the start: the model begins as the MADE's hidden path alone.
        self.direct_kernel = self.add_weight((size, size), initializer="zeros",
                                             name="direct_kernel")

    def _masked(self, kernel, degrees_in, degrees_out, strict):
        """kernel ⊙ M with M_jk = 1[out_k > in_j] (``strict``) or 1[out_k ≥ in_j]."""
        degrees_in = ops.expand_dims(ops.convert_to_tensor(degrees_in), 1)
        degrees_out = ops.expand_dims(ops.convert_to_tensor(degrees_out), 0)
        compare = ops.greater if strict else ops.greater_equal
        return kernel * ops.cast(compare(degrees_out, degrees_in), kernel.dtype)

    def _drop(self, i, hidden, training):
        return self.dropouts[i](hidden, training=training) if self.dropouts else hidden

    def call(self, z, x, training=False):
        size = math.prod(self.data_shape)
        n = ops.shape(x)[0]
        x = ops.cast(ops.reshape(x, (n, size)), self.compute_dtype)
        z = ops.cast(z, self.compute_dtype)
        inputs, degrees = self._degrees[0], self._degrees[1:]
        # The x terms, once per example; they broadcast over z's leading (sample) axes.
        hidden = self.activation(_add_bias(
            ops.matmul(x, self._masked(self.kernels[0], inputs, degrees[0], strict=False))
            + ops.matmul(z, self.latent_kernels[0]), self.biases[0]))
        hidden = self._drop(0, hidden, training)
        for i in range(1, len(degrees)):
            kernel = self._masked(self.kernels[i], degrees[i - 1], degrees[i], strict=False)
            hidden = self.activation(_add_bias(
                ops.matmul(hidden, kernel) + ops.matmul(z, self.latent_kernels[i]),
                self.biases[i]))
            hidden = self._drop(i, hidden, training)
        output_kernel = self._masked(self.kernels[-1], degrees[-1], inputs, strict=True)
        direct_kernel = self._masked(self.direct_kernel, inputs, inputs, strict=True)
        logits = _add_bias(ops.matmul(hidden, output_kernel) + ops.matmul(x, direct_kernel)
                           + ops.matmul(z, self.latent_kernels[-1]), self.biases[-1])
        logits = ops.cast(logits, "float32")
        return ops.reshape(logits, tuple(ops.shape(logits)[:-1]) + self.data_shape)

    def get_config(self):
        return {**super().get_config(), "data_shape": list(self.data_shape),
                "latent_dim": self.latent_dim, "hidden_units": list(self.hidden_units),
                "activation": self.activation_name, "dropout": self.dropout, "seed": self.seed}


def pixelcnn_mask(shape, include_center):
    """The mask of a k×k convolution kernel of ``shape`` (k, k, in, out) whose output at
    pixel i reads pixels before i in raster order (rows above, and the same row to the
    left), and pixel i itself only if ``include_center``: 1 for the allowed taps, 0 for the
    others."""
    mask = np.zeros(shape, "float32")
    center = shape[0] // 2
    mask[:center] = 1.0
    mask[center, :center + int(include_center)] = 1.0
    return mask


@keras.saving.register_keras_serializable(package="keras_vae")
class PixelCNNMADEDecoder(MADEDecoder):
    """A ``MADEDecoder`` whose logits also read masked convolutions of the image (a
    PixelCNN, van den Oord et al., 2016), for single-channel H×W images:

        ℓ = MADE(x, z) + w_o · g_L(x),   g_0 = relu(A ⋆ x + c_0),
        g_l = g_{l−1} + relu(B_l ⋆ g_{l−1} + c_l)   (l = 1..L),

    A a 7×7 kernel that reads, at pixel d, the pixels before d in raster order only (mask
    type A), B_l 3×3 kernels that also read pixel d's own features (type B), which depend
    on x_<d only; so g_L(x)_d and ℓ_d read x_<d only and p_θ(x|z) stays normalized. The
    convolutions see the neighbourhood of each pixel; the MADE carries z and the dependence
    on pixels far away. g_L does not depend on z: it is computed once per example for all
    the samples of z in one call, not once per sample. ``filters`` are the widths of
    g_0..g_L (equal, for the residual sum); w_o starts at zero, so the model begins as the
    MADE alone.
    """

    def __init__(self, data_shape, latent_dim, hidden_units=(500, 500), activation="tanh",
                 dropout=0.0, seed=None, filters=(32, 32, 32, 32, 32), **kwargs):
        super().__init__(data_shape, latent_dim, hidden_units, activation, dropout, seed,
                         **kwargs)
        self.filters = tuple(int(n) for n in filters)
        if len(self.data_shape) != 3 or self.data_shape[-1] != 1:
            raise ValueError(
                f"Architecture 'pixelcnn_made' models single-channel images of shape "
                f"(height, width, 1); got data_shape={self.data_shape}.")
        if not self.filters or len(set(self.filters)) != 1:
            raise ValueError(
                f"Architecture 'pixelcnn_made' needs one or more equal convolution widths "
                f"(residual layers); got filters={self.filters}.")

    def build(self, z_shape=None, x_shape=None):
        super().build()
        width = self.filters[0]
        self.conv_kernels, self.conv_biases = [], []
        for i in range(len(self.filters)):
            size, channels_in = (7, 1) if i == 0 else (3, width)
            self.conv_kernels.append(self.add_weight(
                (size, size, channels_in, width), initializer="he_normal",
                name=f"conv_kernel_{i}"))
            self.conv_biases.append(self.add_weight((width,), initializer="zeros",
                                                    name=f"conv_bias_{i}"))
        self.pixel_head = self.add_weight((width, 1), initializer="zeros", name="pixel_head")

    def call(self, z, x, training=False):
        logits = super().call(z, x, training)
        features = ops.cast(ops.reshape(x, (-1,) + self.data_shape), self.compute_dtype)
        for i, (kernel, bias) in enumerate(zip(self.conv_kernels, self.conv_biases)):
            # The rows of a k×k kernel below its centre are all masked: convolving with
            # its top c + 1 rows over x padded by c above (c = k // 2) and none below
            # gives the same "same"-padded result for (c + 1)/k of the multiplies.
            c = kernel.shape[0] // 2
            mask = pixelcnn_mask(tuple(kernel.shape), include_center=i > 0)[:c + 1]
            padded = ops.pad(features, ((0, 0), (c, 0), (c, c), (0, 0)))
            update = ops.relu(_add_bias(
                ops.conv(padded, kernel[:c + 1] * ops.cast(mask, kernel.dtype), padding="valid"),
                bias))
            features = update if i == 0 else features + update
        pixel_logits = ops.cast(ops.matmul(features, self.pixel_head), "float32")
        # [n, H, W, 1]; broadcasts over z's leading (sample) axes.
        return logits + pixel_logits

    def get_config(self):
        return {**super().get_config(), "filters": list(self.filters)}


def build_networks(architecture, data_shape, latent_dim, hidden_units, filters, activation,
                   dtype=None, dropout=0.0, seed=None, output_dtype=None):
    """Returns ``(encoder_network, decoder_network)`` of the named family, their layers in
    the dtype policy ``dtype`` (default: the global one) but for the mlp and conv decoders'
    output layer, in ``output_dtype`` (default: ``dtype``), with ``dropout`` on the
    decoder's hidden units while training."""
    data_shape = tuple(data_shape)
    if architecture == "mlp":
        return (
            mlp_encoder(data_shape, hidden_units, activation, dtype),
            mlp_decoder(data_shape, latent_dim, hidden_units, activation, dtype, dropout, seed,
                        output_dtype),
        )
    if architecture == "conv":
        return (
            conv_encoder(data_shape, filters, hidden_units, activation, dtype),
            conv_decoder(data_shape, latent_dim, filters, activation, dtype, dropout, seed,
                         output_dtype),
        )
    if architecture == "made":
        made = MADEDecoder(data_shape, latent_dim, tuple(reversed(hidden_units)), activation,
                           dropout, seed, dtype=dtype, name="decoder_network")
        return mlp_encoder(data_shape, hidden_units, activation, dtype), made
    if architecture == "pixelcnn_made":
        decoder = PixelCNNMADEDecoder(data_shape, latent_dim, tuple(reversed(hidden_units)),
                                      activation, dropout, seed, filters, dtype=dtype,
                                      name="decoder_network")
        return mlp_encoder(data_shape, hidden_units, activation, dtype), decoder
    raise ValueError(
        f"Unknown architecture {architecture!r}; expected one of {ARCHITECTURES}."
    )
