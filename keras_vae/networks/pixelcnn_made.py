"""The PixelCNN + MADE family: the MADE decoder plus masked convolutions of x_<d (a small
PixelCNN) for single-channel images."""

import keras
import numpy as np
from keras import ops

from keras_vae.networks import mlp
from keras_vae.networks.layers import add_bias
from keras_vae.networks.made import MADEDecoder


def pixelcnn_mask(shape, include_center):
    """The mask of a k×k convolution kernel of ``shape`` (k, k, in, out) whose output at
    pixel i reads pixels before i in raster order (rows above, and the same row to the
    left), and pixel i itself only if ``include_center``: 1 for the allowed taps, 0 for the
    others."""
    mask = np.zeros(shape, "float32")
    center = shape[0] // 2
    mask[:center] = 1.0
    mask[center, : center + int(include_center)] = 1.0
    return mask


def masked_conv_relu(features, kernel, bias, include_center):
    """relu(M ⋆ features + bias) at every pixel, "same" size, M the k×k ``kernel`` masked by
    ``pixelcnn_mask``: pixel d reads the features of the pixels before d (and of d itself if
    ``include_center``)."""
    # The rows of a k×k kernel below its centre are all masked: convolving with its top
    # c + 1 rows over the features padded by c above (c = k // 2) and none below gives the
    # same "same"-padded result for (c + 1)/k of the multiplies.
    c = kernel.shape[0] // 2
    mask = pixelcnn_mask(tuple(kernel.shape), include_center)[: c + 1]
    padded = ops.pad(features, ((0, 0), (c, 0), (c, c), (0, 0)))
    masked = kernel[: c + 1] * ops.cast(mask, kernel.dtype)
    return ops.relu(add_bias(ops.conv(padded, masked, padding="valid"), bias))


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

    With ``pixel_head_units`` u > 0, z also meets the convolutions' features at each pixel:

        ℓ += v · relu(U g_L(x)_d + (W z)_d + b),

    W z ∈ R^{H×W×u} a learned map of z (one u-vector per pixel), U ∈ R^{f×u}; U g_L(x) is
    computed once per example and only W z and the u-wide product once per sample. With
    ``pixel_head_layers`` m > 0, the head's units h_0 = relu(U g_L(x)_d + (W z)_d + b) pass
    through m masked 3×3 residual layers, h_j = h_{j−1} + relu(M_j ⋆ h_{j−1} + b_j) (type B
    masks, so h_j at d still reads x_<d only), and ℓ += v · h_m; these run once per sample
    of z. v starts at zero; the head's units are not dropped out.
    """

    def __init__(
        self,
        data_shape,
        latent_dim,
        hidden_units=(500, 500),
        activation="tanh",
        dropout=0.0,
        seed=None,
        filters=(32, 32, 32, 32, 32),
        pixel_head_units=0,
        pixel_head_layers=0,
        **kwargs,
    ):
        super().__init__(data_shape, latent_dim, hidden_units, activation, dropout, seed, **kwargs)
        self.filters = tuple(int(n) for n in filters)
        self.pixel_head_units = int(pixel_head_units)
        self.pixel_head_layers = int(pixel_head_layers)
        if self.pixel_head_layers and not self.pixel_head_units:
            raise ValueError(
                f"pixel_head_layers={self.pixel_head_layers} needs a pixel head: set "
                f"pixel_head_units > 0."
            )
        if len(self.data_shape) != 3 or self.data_shape[-1] != 1:
            raise ValueError(
                f"Architecture 'pixelcnn_made' models single-channel images of shape "
                f"(height, width, 1); got data_shape={self.data_shape}."
            )
        if not self.filters or len(set(self.filters)) != 1:
            raise ValueError(
                f"Architecture 'pixelcnn_made' needs one or more equal convolution widths "
                f"(residual layers); got filters={self.filters}."
            )

    def build(self, z_shape=None, x_shape=None):
        super().build()
        width = self.filters[0]
        self.conv_kernels, self.conv_biases = [], []
        for i in range(len(self.filters)):
            size, channels_in = (7, 1) if i == 0 else (3, width)
            self.conv_kernels.append(
                self.add_weight(
                    (size, size, channels_in, width),
                    initializer="he_normal",
                    name=f"conv_kernel_{i}",
                )
            )
            self.conv_biases.append(
                self.add_weight((width,), initializer="zeros", name=f"conv_bias_{i}")
            )
        self.pixel_head = self.add_weight((width, 1), initializer="zeros", name="pixel_head")
        units = self.pixel_head_units
        if units:
            height, columns, _ = self.data_shape
            self.head_latent_kernel = self.add_weight(
                (self.latent_dim, height * columns * units), name="head_latent_kernel"
            )
            self.head_feature_kernel = self.add_weight(
                (width, units), initializer="he_normal", name="head_feature_kernel"
            )
            self.head_bias = self.add_weight((units,), initializer="zeros", name="head_bias")
            self.head_output = self.add_weight((units, 1), initializer="zeros", name="head_output")
        self.head_conv_kernels = [
            self.add_weight(
                (3, 3, units, units), initializer="he_normal", name=f"head_conv_kernel_{j}"
            )
            for j in range(self.pixel_head_layers)
        ]
        self.head_conv_biases = [
            self.add_weight((units,), initializer="zeros", name=f"head_conv_bias_{j}")
            for j in range(self.pixel_head_layers)
        ]

    def call(self, z, x, training=False):
        logits = super().call(z, x, training)
        features = ops.cast(ops.reshape(x, (-1,) + self.data_shape), self.compute_dtype)
        for i, (kernel, bias) in enumerate(zip(self.conv_kernels, self.conv_biases)):
            update = masked_conv_relu(features, kernel, bias, include_center=i > 0)
            features = update if i == 0 else features + update
        pixel_logits = ops.cast(ops.matmul(features, self.pixel_head), "float32")
        # [n, H, W, 1]; broadcasts over z's leading (sample) axes.
        logits = logits + pixel_logits
        if self.pixel_head_units:
            logits = logits + self._head_logits(z, features)
        return logits

    def _head_logits(self, z, features):
        """v · relu(U g_L(x)_d + (W z)_d + b) for every pixel d: [..., n, H, W, 1]."""
        mixed = add_bias(ops.matmul(features, self.head_feature_kernel), self.head_bias)
        z_map = ops.matmul(ops.cast(z, self.compute_dtype), self.head_latent_kernel)
        shape = tuple(ops.shape(z)[:-1]) + self.data_shape[:2] + (self.pixel_head_units,)
        hidden = ops.relu(mixed + ops.reshape(z_map, shape))
        if self.pixel_head_layers:
            # The convolutions take [samples × n, H, W, u].
            hidden = ops.reshape(hidden, (-1,) + shape[-3:])
            for kernel, bias in zip(self.head_conv_kernels, self.head_conv_biases):
                hidden = hidden + masked_conv_relu(hidden, kernel, bias, include_center=True)
            hidden = ops.reshape(hidden, shape)
        return ops.cast(ops.matmul(hidden, self.head_output), "float32")

    def get_config(self):
        return {
            **super().get_config(),
            "filters": list(self.filters),
            "pixel_head_units": self.pixel_head_units,
            "pixel_head_layers": self.pixel_head_layers,
        }


def build(data_shape, latent_dim, config, dtype=None, output_dtype=None, seed=None):
    """(MLP encoder, PixelCNN + MADE decoder) of ``config``."""
    decoder = PixelCNNMADEDecoder(
        data_shape,
        latent_dim,
        tuple(reversed(config.hidden_units)),
        config.activation,
        config.dropout,
        seed,
        config.filters,
        config.pixel_head_units,
        config.pixel_head_layers,
        dtype=dtype,
        name="decoder_network",
    )
    return mlp.encoder(data_shape, config.hidden_units, config.activation, dtype), decoder
