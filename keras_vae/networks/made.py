"""The MADE family: an MLP encoder and an autoregressive decoder
p_θ(x|z) = Π_d p(x_d | x_<d, z), a MADE that z enters at every layer (binary data)."""

import itertools
import math

import keras
import numpy as np
from keras import ops

from keras_vae.networks import mlp
from keras_vae.networks.layers import add_bias, dropout_layers


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

    autoregressive = True

    def __init__(
        self,
        data_shape,
        latent_dim,
        hidden_units=(500, 500),
        activation="tanh",
        dropout=0.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.data_shape = tuple(int(n) for n in data_shape)
        self.latent_dim = int(latent_dim)
        self.hidden_units = tuple(int(n) for n in hidden_units)
        self.activation = keras.activations.get(activation)
        self.activation_name = activation
        self.dropout = float(dropout)
        self.seed = seed
        # One Dropout per hidden layer, owned by this layer (its SeedGenerator with it).
        self.dropouts = [
            layer
            for i in range(len(self.hidden_units))
            for layer in dropout_layers(self.dropout, seed, i, self.dtype_policy)
        ]
        if not self.hidden_units:
            raise ValueError("MADEDecoder needs at least one hidden layer; got hidden_units=().")
        size = math.prod(self.data_shape)
        # The degrees fix the masks; the masks themselves (D×H floats each) are built in
        # call(), so that traced graphs and SavedModels hold the degrees, not the masks.
        self._degrees = [np.arange(1, size + 1, dtype="int32")]
        self._degrees += [made_degrees(units, size).astype("int32") for units in self.hidden_units]

    def build(self, z_shape=None, x_shape=None):
        size = math.prod(self.data_shape)
        widths = (size,) + self.hidden_units + (size,)
        self.kernels, self.latent_kernels, self.biases = [], [], []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            self.kernels.append(
                self.add_weight((fan_in, fan_out), initializer="glorot_uniform", name=f"kernel_{i}")
            )
            self.latent_kernels.append(
                self.add_weight(
                    (self.latent_dim, fan_out),
                    initializer="glorot_uniform",
                    name=f"latent_kernel_{i}",
                )
            )
            self.biases.append(self.add_weight((fan_out,), initializer="zeros", name=f"bias_{i}"))
        # Zero at the start: the model begins as the MADE's hidden path alone.
        self.direct_kernel = self.add_weight(
            (size, size), initializer="zeros", name="direct_kernel"
        )

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
        hidden = self.activation(
            add_bias(
                ops.matmul(x, self._masked(self.kernels[0], inputs, degrees[0], strict=False))
                + ops.matmul(z, self.latent_kernels[0]),
                self.biases[0],
            )
        )
        hidden = self._drop(0, hidden, training)
        for i in range(1, len(degrees)):
            kernel = self._masked(self.kernels[i], degrees[i - 1], degrees[i], strict=False)
            hidden = self.activation(
                add_bias(
                    ops.matmul(hidden, kernel) + ops.matmul(z, self.latent_kernels[i]),
                    self.biases[i],
                )
            )
            hidden = self._drop(i, hidden, training)
        output_kernel = self._masked(self.kernels[-1], degrees[-1], inputs, strict=True)
        direct_kernel = self._masked(self.direct_kernel, inputs, inputs, strict=True)
        logits = add_bias(
            ops.matmul(hidden, output_kernel)
            + ops.matmul(x, direct_kernel)
            + ops.matmul(z, self.latent_kernels[-1]),
            self.biases[-1],
        )
        logits = ops.cast(logits, "float32")
        return ops.reshape(logits, tuple(ops.shape(logits)[:-1]) + self.data_shape)

    def draw(self, z, noise=None):
        """x ~ p_θ(x|z) element by element for z [n, d]: x_d = 1[u_d < p_d] for uniform
        ``noise`` u [n, *data_shape], or with ``noise=None`` (u = ½) the greedy path
        x_d = 1[p_d > ½]. D passes, the d-th fixing x_d, which no later pass changes since
        ℓ_d reads x_<d only."""
        if len(z.shape) != 2:
            raise ValueError(
                f"Drawing x from the autoregressive decoder takes z of shape (n, "
                f"{self.latent_dim}); got shape {tuple(z.shape)}."
            )
        n, size = ops.shape(z)[0], math.prod(self.data_shape)
        u = 0.5 if noise is None else ops.reshape(ops.cast(noise, "float32"), (n, size))

        def draw_element(d, x):
            logits = ops.reshape(self(z, ops.reshape(x, (n,) + self.data_shape)), (n, size))
            one_hot = ops.one_hot(d, size)
            p_d = ops.sum(ops.sigmoid(logits) * one_hot, axis=1, keepdims=True)
            u_d = u if noise is None else ops.sum(u * one_hot, axis=1, keepdims=True)
            return x + ops.cast(u_d < p_d, "float32") * one_hot

        x = ops.fori_loop(0, size, draw_element, ops.zeros((n, size), "float32"))
        return ops.reshape(x, (n,) + self.data_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "data_shape": list(self.data_shape),
            "latent_dim": self.latent_dim,
            "hidden_units": list(self.hidden_units),
            "activation": self.activation_name,
            "dropout": self.dropout,
            "seed": self.seed,
        }


def build(data_shape, latent_dim, config, dtype=None, output_dtype=None, seed=None):
    """(MLP encoder, MADE decoder) of ``config``; the decoder's hidden widths mirror the
    encoder's."""
    decoder = MADEDecoder(
        data_shape,
        latent_dim,
        tuple(reversed(config.hidden_units)),
        config.activation,
        config.dropout,
        seed,
        dtype=dtype,
        name="decoder_network",
    )
    return mlp.encoder(data_shape, config.hidden_units, config.activation, dtype), decoder
