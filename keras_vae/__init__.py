"""keras-vae: variational autoencoders for Keras 3 on TensorFlow."""

from keras_vae.likelihoods import (
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    GaussianLikelihood,
    get_likelihood,
)
from keras_vae.model import VAE
from keras_vae.optimizers import FusedAdam
from keras_vae.sampling import Sampling

__all__ = [
    "VAE",
    "BernoulliLikelihood",
    "ContinuousBernoulliLikelihood",
    "FusedAdam",
    "GaussianLikelihood",
    "Sampling",
    "get_likelihood",
]
__version__ = "0.1.0"
