"""A learned conditional prior p(z|y) for conditional VAEs."""

import keras
import tensorflow_probability as tfp
from keras import ops

tfd = tfp.distributions


@keras.saving.register_keras_serializable(package="keras_vae")
class ConditionalGaussian(keras.layers.Layer):
    """p(z|y) = N(m(y), diag s(y)²) with [m(y), log s(y)] = c(y) A + a, linear in the
    condition c(y): for one-hot classes, each class's own learned means and scales. A and a
    start at zero, so that the untrained prior is N(0, I) for every y."""

    analytic_kl = True
    reads_posterior = False
    reads_condition = True

    def __init__(self, name="prior", **kwargs):
        super().__init__(name=name, **kwargs)

    def build(self, latent_shape, data_shape=None, condition_dim=0):
        self.latent_dim = int(latent_shape[-1])
        width = 2 * self.latent_dim
        self.kernel = self.add_weight(
            shape=(int(condition_dim), width), initializer="zeros", name="kernel", dtype="float32"
        )
        self.bias = self.add_weight(
            shape=(width,), initializer="zeros", name="bias", dtype="float32"
        )

    def loc_and_scale(self, c):
        """m(y) and s(y), each [n, d], for the conditions c(y) [n, C]."""
        h = ops.matmul(ops.cast(c, "float32"), self.kernel) + self.bias
        return h[:, : self.latent_dim], ops.exp(h[:, self.latent_dim :])

    def distribution(self, posterior_at=None, c=None):
        """p(z|y) = N(m(y), diag s(y)²), batch shape [n] for c(y) [n, C]."""
        loc, scale = self.loc_and_scale(c)
        return tfd.MultivariateNormalDiag(loc=loc, scale_diag=scale)

    def marginals(self, c=None):
        loc, scale = self.loc_and_scale(c)
        return tfd.Normal(loc=loc, scale=scale)
