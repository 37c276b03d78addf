"""Encoder and decoder networks of the named families (``registry.REGISTRY["network"]``).

An encoder network maps x ∈ R^{data_shape} to a feature vector; the model's posterior puts
its heads (μ_φ(x), log σ²_φ(x)) on top of it. A decoder network maps z ∈ R^d to the
likelihood's parameters, one per data element (shape ``data_shape``): Bernoulli logits or
the Gaussian mean μ_θ(z). An autoregressive decoder (``autoregressive = True``) also reads
x: ``call(z, x)`` gives the parameter of x_d from z and x_<d, and ``draw(z, noise)`` draws x
one element at a time. A family is a module with ``build(data_shape, latent_dim, config,
dtype, output_dtype, seed)`` → (encoder, decoder), registered in ``keras_vae.registry``.
"""

from keras_vae import registry
from keras_vae.model_config import NetworkConfig
from keras_vae.settings import validate


def build(
    architecture, data_shape, latent_dim, likelihood="bernoulli", dtype=None, seed=None, **settings
):
    """``(encoder, decoder)`` of the named family for data of ``data_shape`` and a latent of
    size ``latent_dim``; ``settings`` are ``NetworkConfig``'s (hidden_units, filters,
    activation, dropout, pixel_head_units, pixel_head_layers). The layers compute in the
    dtype policy ``dtype`` (default: the global one), but a decoder's output layer computes
    in float32 when the likelihood (a registered name or a likelihood layer) needs float32
    parameters; ``seed`` seeds dropout.
    """
    config = validate(NetworkConfig(architecture=architecture, **settings))
    if isinstance(likelihood, str):
        likelihood = registry.load("likelihood", likelihood)
    output_dtype = "float32" if likelihood.needs_float32_params else None
    family = registry.load("network", config.architecture)
    return family(
        tuple(int(n) for n in data_shape),
        int(latent_dim),
        config,
        dtype=dtype,
        output_dtype=output_dtype,
        seed=seed,
    )
