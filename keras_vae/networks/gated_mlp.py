"""The gated MLP family, the networks of the VampPrior paper (Tomczak & Welling, 2018): the
MLP family with each hidden layer a ``GatedDense``, a(W x + b) ⊙ sigmoid(V x + c), a the
``activation`` (the paper's: linear)."""

from keras_vae.networks import mlp
from keras_vae.networks.layers import GatedDense


def build(data_shape, latent_dim, config, dtype=None, output_dtype=None, seed=None):
    """(encoder, decoder) of ``config`` (a ``NetworkConfig``)."""
    return mlp.build(data_shape, latent_dim, config, dtype, output_dtype, seed, GatedDense)
