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

import math

import keras
import tensorflow as tf
import tensorflow_probability as tfp
from keras import ops

tfd = tfp.distributions


class DiagonalGaussianMixture(tfd.Distribution):
    """Σ_k softmax(a)_k N(z; m_k, diag s_k²), k = 1..K, over z ∈ R^d (batch shape []): the
    mixture priors' p(z), from ``logits`` a [K], ``loc`` m [K, d] and ``scale`` s [K, d].

    ``log_prob`` is logsumexp_k of log π_k + log N(z; m_k, diag s_k²), whose quadratic
    Σ_j (z_j − m_kj)²/s_kj² = z²·A_k − 2 z·(m⊙A)_k + m²·A_k (A = s⁻²) makes each term one
    inner product [z², z, 1]·[−½A_k, (m⊙A)_k, c_k], c_k = log π_k − Σ_j log s_kj
    − (d/2) log 2π − ½ m²·A_k: one matmul over all K components (TFP's
    ``MixtureSameFamily`` broadcasts z against every component, [..., K, d]), in float64,
    where the cancellation of those terms keeps enough digits; draws are not
    reparameterized."""

    def __init__(self, logits, loc, scale, name="DiagonalGaussianMixture"):
        parameters = dict(locals())
        self.logits = tf.convert_to_tensor(logits, tf.float32)
        self.loc = tf.convert_to_tensor(loc, tf.float32)
        self.scale = tf.convert_to_tensor(scale, tf.float32)
        super().__init__(
            dtype=tf.float32,
            reparameterization_type=tfd.NOT_REPARAMETERIZED,
            validate_args=False,
            allow_nan_stats=True,
            parameters=parameters,
            name=name,
        )

    def _event_shape(self):
        return self.loc.shape[-1:]

    def _event_shape_tensor(self):
        return tf.shape(self.loc)[-1:]

    def _batch_shape(self):
        return tf.TensorShape([])

    def _batch_shape_tensor(self):
        return tf.constant([], tf.int32)

    def _log_prob(self, z):
        d = tf.shape(self.loc)[-1]
        flat = tf.reshape(tf.cast(z, tf.float64), [-1, d])
        loc = tf.cast(self.loc, tf.float64)
        log_scale = tf.math.log(tf.cast(self.scale, tf.float64))
        precision = tf.exp(-2.0 * log_scale)
        constant = (
            tf.nn.log_softmax(tf.cast(self.logits, tf.float64))
            - tf.reduce_sum(log_scale, axis=-1)
            - tf.cast(d, tf.float64) * (0.5 * math.log(2 * math.pi))
            - 0.5 * tf.reduce_sum(loc**2 * precision, axis=-1)
        )  # [K]
        features = tf.concat([flat**2, flat, tf.ones_like(flat[:, :1])], axis=-1)
        coefficients = tf.concat([-0.5 * precision, loc * precision, constant[:, None]], -1)
        log_terms = tf.matmul(features, coefficients, transpose_b=True)  # [N, K]
        log_p = tf.reduce_logsumexp(log_terms, axis=-1)
        return tf.reshape(tf.cast(log_p, tf.float32), tf.shape(z)[:-1])

    def _sample_n(self, n, seed=None):
        component_seed, noise_seed = tfp.random.split_seed(seed)
        k = tfd.Categorical(logits=self.logits).sample(n, seed=component_seed)
        noise = tf.random.stateless_normal(
            tf.concat([[n], tf.shape(self.loc)[-1:]], 0), seed=noise_seed
        )
        return tf.gather(self.loc, k) + tf.gather(self.scale, k) * noise


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
        return DiagonalGaussianMixture(self.logits, self.means, ops.exp(self.log_scales))
