"""The MLP family: x → flatten → Dense(h₁) → … → Dense(h_n) as the encoder; its mirror
z → Dense(h_n) → … → Dense(h₁) → Dense(D) → reshape as the decoder. Other hidden layers
(``hidden_layer``, e.g. the gated MLP family's) take Dense's place in both."""

import math

import keras

from keras_vae.networks.layers import Dense, dropout_layers


def encoder(data_shape, hidden_units, activation, dtype=None, hidden_layer=Dense):
    """x → flatten → Dense(h₁) → … → Dense(h_n)."""
    layers = [keras.Input(shape=data_shape), keras.layers.Flatten(dtype=dtype)]
    layers += [hidden_layer(units, activation=activation, dtype=dtype) for units in hidden_units]
    return keras.Sequential(layers, name="encoder_network")


def decoder(
    data_shape,
    latent_dim,
    hidden_units,
    activation,
    dtype,
    rate,
    seed,
    output_dtype,
    hidden_layer=Dense,
):
    """z → Dense(h_n) → … → Dense(h₁) → Dense(prod(data_shape)) → reshape (mirror of the
    encoder); dropout of ``rate`` after each hidden layer while training. The output layer computes
    in ``output_dtype`` (default: ``dtype``)."""
    layers = [keras.Input(shape=(latent_dim,))]
    for i, units in enumerate(reversed(hidden_units)):
        layers.append(hidden_layer(units, activation=activation, dtype=dtype))
        layers += dropout_layers(rate, seed, i, dtype)
    layers += [
        Dense(math.prod(data_shape), dtype=output_dtype or dtype),
        keras.layers.Reshape(data_shape, dtype=output_dtype or dtype),
    ]
    return keras.Sequential(layers, name="decoder_network")


def build(
    data_shape, latent_dim, config, dtype=None, output_dtype=None, seed=None, hidden_layer=Dense
):
    """(encoder, decoder) of ``config`` (a ``NetworkConfig``), with ``hidden_layer`` layers."""
    return (
        encoder(data_shape, config.hidden_units, config.activation, dtype, hidden_layer),
        decoder(
            data_shape,
            latent_dim,
            config.hidden_units,
            config.activation,
            dtype,
            config.dropout,
            seed,
            output_dtype,
            hidden_layer,
        ),
    )
