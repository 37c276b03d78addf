"""Posteriors q_φ(z|x): from the encoder's features to a distribution over z.

A posterior is a Keras layer with:
- ``build(features_shape, latent_dim)``, called by the model;
- ``call(features)``: its parameters, a dict of float32 tensors [batch, …] (what the
  ``encode`` signature serves);
- ``distribution(params)``: q_φ(z|x) as a TFP distribution, batch shape [batch], event
  shape [d], with ``log_prob``;
- ``sample(params, num_samples, seed=None, epsilon=None)``: reparameterized draws
  z [K, batch, d], differentiable in φ; ``epsilon`` [K, batch or 1, d] fixes the base noise;
- ``sample_and_log_prob(params, num_samples, seed=None, epsilon=None)``: those draws and
  log q_φ(z|x) at them [K, batch] (a flow scores its own draws cheaply);
- ``mean(params)``: the point z at which the model reconstructs x;
- ``marginals(params)``: the factors q(z_j|x) as one TFP distribution with batch shape
  [batch, d] when q(z|x) = Π_j q(z_j|x), else None;
- ``analytic_kl``: whether KL(q ‖ p) has a closed form for the priors that have one;
- ``params_complete``: whether q is a function of ``params`` alone (no weights of its own
  past the heads that make them), so that stopping ``params`` stops φ in log q(z|x), as
  the DReG estimator needs, and its density for a batch of other examples' ``params`` is
  one broadcast evaluation, as the VampPrior needs.
"""

import keras
import tensorflow_probability as tfp
from keras import ops

from keras_vae.networks.layers import Dense
from keras_vae.sampling import Sampling

tfd = tfp.distributions


def gaussian(mean, log_var):
    """N(mean, diag exp(log_var)) over the last axis."""
    return tfd.MultivariateNormalDiag(loc=mean, scale_diag=ops.exp(0.5 * log_var))


@keras.saving.register_keras_serializable(package="keras_vae")
class DiagonalGaussian(keras.layers.Layer):
    """q_φ(z|x) = N(μ_φ(x), diag σ²_φ(x)), μ and log σ² linear in the encoder's features;
    z = μ + σ ⊙ ε by the ``Sampling`` layer (seeded by ``seed``)."""

    analytic_kl = True
    params_complete = True

    def __init__(self, seed=None, name="posterior", **kwargs):
        super().__init__(name=name, **kwargs)
        self.seed = seed
        self.sampling = Sampling(seed=seed, dtype="float32", name="sampling")

    def build(self, features_shape, latent_dim):
        self.z_mean_head = Dense(latent_dim, name="z_mean", dtype=self.dtype_policy)
        self.z_log_var_head = Dense(latent_dim, name="z_log_var", dtype=self.dtype_policy)
        self.z_mean_head.build(features_shape)
        self.z_log_var_head.build(features_shape)

    def call(self, features):
        return {
            "z_mean": ops.cast(self.z_mean_head(features), "float32"),
            "z_log_var": ops.cast(self.z_log_var_head(features), "float32"),
        }

    def distribution(self, params):
        return gaussian(params["z_mean"], params["z_log_var"])

    def sample(self, params, num_samples, seed=None, epsilon=None):
        return self.sampling(
            (params["z_mean"], params["z_log_var"]),
            num_samples=num_samples,
            seed=seed,
            epsilon=epsilon,
        )

    def sample_and_log_prob(self, params, num_samples, seed=None, epsilon=None):
        z = self.sample(params, num_samples, seed=seed, epsilon=epsilon)
        return z, self.distribution(params).log_prob(z)

    def mean(self, params):
        return params["z_mean"]

    def marginals(self, params):
        return tfd.Normal(loc=params["z_mean"], scale=ops.exp(0.5 * params["z_log_var"]))

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}
