"""Priors p(z) over the latent z ∈ R^d.

A prior is a Keras layer (so that a learned prior's weights are tracked and saved) with:
- ``build((d,))``, called by the model with the latent size;
- ``distribution()``: p(z) as a TFP distribution with event shape [d] (``log_prob``,
  ``sample(n, seed=stateless seed)``);
- ``analytic_kl``: whether KL(q_φ(z|x) ‖ p(z)) has a closed form (``tfd.kl_divergence``)
  for the model's posterior, so that ``kl="analytic"`` can use it.
"""

import keras
import tensorflow_probability as tfp
from keras import ops

tfd = tfp.distributions


@keras.saving.register_keras_serializable(package="keras_vae")
class StandardNormal(keras.layers.Layer):
    """p(z) = N(0, I)."""

    analytic_kl = True

    def __init__(self, name="prior", **kwargs):
        super().__init__(name=name, **kwargs)

    def build(self, latent_shape):
        self.latent_dim = int(latent_shape[-1])

    def distribution(self):
        return tfd.MultivariateNormalDiag(loc=ops.zeros((self.latent_dim,), "float32"))
