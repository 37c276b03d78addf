"""Priors p(z) over the latent z ∈ R^d.

A prior is a Keras layer (so that a learned prior's weights are tracked and saved) with:
- ``build(latent_shape, data_shape, condition_dim=0)``, called by the model with (d,),
  x's shape and C, the size of a conditional model's c(y) (0 for an unconditional one);
- ``distribution(posterior_at, c=None)``: p(z) as a TFP distribution with event shape [d]
  (``log_prob``, ``sample(n, seed=stateless seed)``); ``posterior_at`` maps inputs x
  [n, *data_shape] to q_φ(z|x) (batch shape [n]), for priors built from the posterior;
  a prior that reads the condition gets c(y) [n, C] and returns p(z|y), batch shape [n];
- ``marginals(c=None)``: the factors p(z_j) (p(z_j|y)) as one TFP distribution with batch
  shape [d] ([n, d]) when p(z) = Π_j p(z_j), else None (per-dimension KL and free bits
  need them);
- ``reads_posterior``: whether p is built from q_φ (so that φ reaches log p(z) directly);
  such a prior also has ``can_read(posterior)``, whether it can be built from that
  posterior, and ``posterior_requirement``, what it needs, in words;
- ``reads_condition``: whether p is p(z|y), a function of a conditional model's c(y);
- ``analytic_kl``: whether KL(q_φ(z|x) ‖ p(z)) has a closed form (``tfd.kl_divergence``)
  for the model's posterior; where it has none the model estimates it by Monte Carlo.
"""

import keras
import tensorflow_probability as tfp
from keras import ops

tfd = tfp.distributions


@keras.saving.register_keras_serializable(package="keras_vae")
class StandardNormal(keras.layers.Layer):
    """p(z) = N(0, I)."""

    analytic_kl = True
    reads_posterior = False
    reads_condition = False

    def __init__(self, name="prior", **kwargs):
        super().__init__(name=name, **kwargs)

    def build(self, latent_shape, data_shape=None, condition_dim=0):
        self.latent_dim = int(latent_shape[-1])

    def distribution(self, posterior_at=None, c=None):
        """N(0, I) over z ∈ R^d."""
        return tfd.MultivariateNormalDiag(loc=ops.zeros((self.latent_dim,), "float32"))

    def marginals(self, c=None):
        return tfd.Normal(loc=ops.zeros((self.latent_dim,), "float32"), scale=1.0)


class MixturePrior(keras.layers.Layer):
    """The base of a prior that is a mixture of K = ``num_components`` components, its
    learned weights initialised with ``seed``; no closed-form KL, no factors."""

    analytic_kl = False
    reads_posterior = False
    reads_condition = False

    def __init__(self, num_components=10, seed=None, name="prior", **kwargs):
        super().__init__(name=name, **kwargs)
        if int(num_components) < 1:
            raise ValueError(f"num_components must be >= 1; got {num_components}")
        self.num_components = int(num_components)
        self.seed = seed

    def marginals(self, c=None):
        return None

    def get_config(self):
        return {**super().get_config(), "num_components": self.num_components, "seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_vae")
class GaussianMixture(MixturePrior):
    """p(z) = Σ_k π_k N(z; m_k, diag s_k²), k = 1..K, with learned weights π = softmax(a),
    means m_k (initialised N(0, I), seeded) and scales s_k (initialised 1)."""

    def build(self, latent_shape, data_shape=None, condition_dim=0):
        shape = (self.num_components, int(latent_shape[-1]))
        self.logits = self.add_weight(
            shape=(self.num_components,), initializer="zeros", name="logits", dtype="float32"
        )
        self.means = self.add_weight(
            shape=shape,
            initializer=keras.initializers.RandomNormal(seed=self.seed),
            name="means",
            dtype="float32",
        )
        self.log_scales = self.add_weight(
            shape=shape, initializer="zeros", name="log_scales", dtype="float32"
        )

    def distribution(self, posterior_at=None, c=None):
        """Σ_k softmax(a)_k N(m_k, diag exp(2 log s_k)) over z ∈ R^d."""
        return tfd.MixtureSameFamily(
            tfd.Categorical(logits=ops.convert_to_tensor(self.logits)),
            tfd.MultivariateNormalDiag(
                loc=ops.convert_to_tensor(self.means), scale_diag=ops.exp(self.log_scales)
            ),
        )
