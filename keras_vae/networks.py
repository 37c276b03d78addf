"""Encoder and decoder networks, by family name.

An encoder network maps x ∈ R^{data_shape} to a feature vector; the VAE puts the two
linear heads μ_φ(x) and log σ²_φ(x) on top of it. A decoder network maps z ∈ R^d to the
likelihood's parameters, one per data element (shape ``data_shape``): Bernoulli logits or
the Gaussian mean μ_θ(z).
"""

import math

import keras

ARCHITECTURES = ("mlp", "conv")


def mlp_encoder(data_shape, hidden_units=(512, 256), activation="relu", dtype=None):
    """x → flatten → Dense(h₁) → … → Dense(h_n)."""
    layers = [keras.Input(shape=data_shape), keras.layers.Flatten(dtype=dtype)]
    layers += [keras.layers.Dense(units, activation=activation, dtype=dtype) for units in hidden_units]
    return keras.Sequential(layers, name="encoder_network")


def mlp_decoder(data_shape, latent_dim, hidden_units=(512, 256), activation="relu", dtype=None):
    """z → Dense(h_n) → … → Dense(h₁) → Dense(prod(data_shape)) → reshape (mirror of the encoder)."""
    layers = [keras.Input(shape=(latent_dim,))]
    layers += [
        keras.layers.Dense(units, activation=activation, dtype=dtype) for units in reversed(hidden_units)
    ]
    layers += [
        # The output layer stays float32 under mixed precision: likelihood parameters
        # (Gaussian means, logits) need more than float16's 3 decimal digits.
        keras.layers.Dense(math.prod(data_shape), dtype="float32"),
        keras.layers.Reshape(data_shape, dtype="float32"),
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
    layers += [keras.layers.Dense(units, activation=activation, dtype=dtype) for units in hidden_units]
    return keras.Sequential(layers, name="encoder_network")


def conv_decoder(data_shape, latent_dim, filters=(32, 64), activation="relu", dtype=None):
    """z → Dense → reshape to (H/2ⁿ, W/2ⁿ, f_n) → Conv2DTranspose(f, 3, stride 2) for f in
    reversed(filters) → Conv2DTranspose(channels, 3) (linear: logits or means).

    With the defaults this is the decoder of the official Keras VAE example.
    """
    _check_image_shape(data_shape, filters)
    factor = 2 ** len(filters)
    height, width, channels = data_shape
    start = (height // factor, width // factor, filters[-1])
    layers = [
        keras.Input(shape=(latent_dim,)),
        keras.layers.Dense(math.prod(start), activation=activation, dtype=dtype),
        keras.layers.Reshape(start, dtype=dtype),
    ]
    layers += [
        keras.layers.Conv2DTranspose(f, 3, strides=2, padding="same", activation=activation,
                                     dtype=dtype)
        for f in reversed(filters)
    ]
    # float32 output layer, as in mlp_decoder.
    layers.append(keras.layers.Conv2DTranspose(channels, 3, padding="same", dtype="float32"))
    return keras.Sequential(layers, name="decoder_network")


def build_networks(architecture, data_shape, latent_dim, hidden_units, filters, activation,
                   dtype=None):
    """Returns ``(encoder_network, decoder_network)`` of the named family, their layers in
    the dtype policy ``dtype`` (default: the global one)."""
    data_shape = tuple(data_shape)
    if architecture == "mlp":
        return (
            mlp_encoder(data_shape, hidden_units, activation, dtype),
            mlp_decoder(data_shape, latent_dim, hidden_units, activation, dtype),
        )
    if architecture == "conv":
        return (
            conv_encoder(data_shape, filters, hidden_units, activation, dtype),
            conv_decoder(data_shape, latent_dim, filters, activation, dtype),
        )
    raise ValueError(
        f"Unknown architecture {architecture!r}; expected one of {ARCHITECTURES}."
    )
