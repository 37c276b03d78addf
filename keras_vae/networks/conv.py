"""The convolutional family: strided 3×3 convolutions down, transposed ones up (the
networks of the official Keras VAE example with filters (32, 64), hidden_units (16,))."""

import math

import keras

from keras_vae.networks.layers import Conv2DTranspose, Dense, dropout_layers


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


def encoder(data_shape, filters, hidden_units, activation, dtype=None):
    """x → Conv2D(f, 3, stride 2) for each f → flatten → Dense(h) for each h.

    With filters (32, 64) and hidden_units (16,) this is the encoder of the official Keras VAE
    example.
    """
    _check_image_shape(data_shape, filters)
    layers = [keras.Input(shape=data_shape)]
    layers += [
        keras.layers.Conv2D(f, 3, strides=2, padding="same", activation=activation, dtype=dtype)
        for f in filters
    ]
    layers.append(keras.layers.Flatten(dtype=dtype))
    layers += [Dense(units, activation=activation, dtype=dtype) for units in hidden_units]
    return keras.Sequential(layers, name="encoder_network")


def decoder(data_shape, latent_dim, filters, activation, dtype, rate, seed, output_dtype):
    """z → Dense → reshape to (H/2ⁿ, W/2ⁿ, f_n) → Conv2DTranspose(f, 3, stride 2) for f in
    reversed(filters) → Conv2DTranspose(channels, 3) (linear: logits or means);
    dropout of ``rate`` after each hidden layer while training; the output layer computes in
    ``output_dtype`` (default: ``dtype``).

    With filters (32, 64) this is the decoder of the official Keras VAE example.
    """
    _check_image_shape(data_shape, filters)
    factor = 2 ** len(filters)
    height, width, channels = data_shape
    start = (height // factor, width // factor, filters[-1])
    layers = [
        keras.Input(shape=(latent_dim,)),
        Dense(math.prod(start), activation=activation, dtype=dtype),
        *dropout_layers(rate, seed, 0, dtype),
        keras.layers.Reshape(start, dtype=dtype),
    ]
    for i, f in enumerate(reversed(filters), start=1):
        layers.append(
            Conv2DTranspose(f, 3, strides=2, padding="same", activation=activation, dtype=dtype)
        )
        layers += dropout_layers(rate, seed, i, dtype)
    layers.append(Conv2DTranspose(channels, 3, padding="same", dtype=output_dtype or dtype))
    return keras.Sequential(layers, name="decoder_network")


def build(data_shape, latent_dim, config, dtype=None, output_dtype=None, seed=None):
    """(encoder, decoder) of ``config`` (a ``NetworkConfig``)."""
    return (
        encoder(data_shape, config.filters, config.hidden_units, config.activation, dtype),
        decoder(
            data_shape,
            latent_dim,
            config.filters,
            config.activation,
            dtype,
            config.dropout,
            seed,
            output_dtype,
        ),
    )
