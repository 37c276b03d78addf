"""keras-vae: variational autoencoders for Keras 3 on TensorFlow.

The names below are imported on first use, so that ``import keras_vae.serving`` (the
client) or ``keras-vae --help`` do not load TensorFlow.
"""

import importlib

_EXPORTS = {
    "VAE": "keras_vae.model",
    "VAEConfig": "keras_vae.model_config",
    "NetworkConfig": "keras_vae.model_config",
    "DistributionsConfig": "keras_vae.model_config",
    "FusedAdam": "keras_vae.optimizers",
    "Sampling": "keras_vae.sampling",
    "BernoulliLikelihood": "keras_vae.likelihoods",
    "ContinuousBernoulliLikelihood": "keras_vae.likelihoods",
    "GaussianLikelihood": "keras_vae.likelihoods",
    "StandardNormal": "keras_vae.priors",
    "GaussianMixture": "keras_vae.priors",
    "VampPrior": "keras_vae.vamp_prior",
    "ConditionalGaussian": "keras_vae.conditional_prior",
    "DiagonalGaussian": "keras_vae.posteriors",
    "IAFPosterior": "keras_vae.iaf",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'keras_vae' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
