"""Likelihoods p_θ(x|z) as TFP distributions over the whole data shape.

Each likelihood is a Keras layer (so learned parameters such as σ are tracked and saved)
whose ``distribution(params)`` turns the decoder output into
``tfd.Independent(..., reinterpreted_batch_ndims=len(data_shape))``: ``log_prob`` sums over
every data element and gives nats per example.

- ``bernoulli``: params are logits ℓ; −log p(x|z) = Σ BCE(x, sigmoid ℓ), computed from the
  logits (never from probabilities passed through a log).
- ``continuous_bernoulli``: for [0, 1] data that is not binary (Loaiza-Ganem & Cunningham, 2019).
- ``gaussian``: N(μ_θ(z), σ²I); −log p = ‖x − μ‖²/(2σ²) + (D/2) log(2πσ²). σ fixed
  (``learn_sigma="none"``), or learned as one shared value or one per data element.
"""

import math

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from keras import ops

from keras_vae.model_config import DistributionsConfig
from keras_vae.settings import validate

tfd = tfp.distributions

# Elements per log in ``fused_bernoulli_log_prob``: fewer logs is faster, and
# each product is at most 2^16, far inside float32's range.
LOG_GROUP = 16


class Likelihood(keras.layers.Layer):
    """Base class: ``distribution(params)`` → p_θ(x|z); ``support``: the interval x lies in
    (None: all reals), checked per batch by ``check_support`` and on whole arrays by
    ``check_array``.

    ``needs_float32_params``: whether the decoder's output layer must compute the params in
    float32 under a mixed dtype policy. Otherwise it computes them in 16 bits, as every
    other layer does, and ``distribution`` casts them to float32: for logits that costs
    little, since the 16-bit hidden units already set most of their error (docs/benchmarks.md).
    """

    needs_float32_params = False
    support = None
    # Optionally a method (params, x) → ``log_prob(params, x)`` that runs XLA-compiled, for
    # training and evaluation (exports never: TF Serving refuses XLA-marked functions).
    fused_log_prob = None

    def build(self, data_shape):
        self.event_ndims = len(data_shape)
        self.event_size = math.prod(data_shape)
        self.built = True

    def log_prob(self, params, x):
        """log p_θ(x|z) per example, summed over the data elements, for the decoder's
        output ``params``."""
        return self.distribution(params).log_prob(x)

    def _independent(self, base):
        return tfd.Independent(base, reinterpreted_batch_ndims=self.event_ndims)

    def _support_message(self):
        low, high = self.support
        return f"the {self.name} likelihood needs data in [{low}, {high}]"

    def check_support(self, x):
        """Assertions (in graph or eager mode) that every x is a value p(x|z) can take,
        each condition reduced to one scalar before it is asserted."""
        # Scalar assertions: these checks run on every training batch, and a reduction is
        # cheaper than an element-wise assertion.
        # x·0 is NaN exactly where x is NaN or ±inf, and a sum of zeros cannot overflow.
        all_finite = tf.math.is_finite(tf.reduce_sum(x * ops.cast(0, x.dtype)))
        checks = [_assert(all_finite, "keras_vae: the data contains NaN or inf")]
        if self.support is not None:
            low, high = (ops.cast(bound, x.dtype) for bound in self.support)
            message = f"keras_vae: {self._support_message()}"
            checks += [
                _assert(tf.reduce_min(x) >= low, message),
                _assert(tf.reduce_max(x) <= high, message),
            ]
        return checks

    def check_array(self, x):
        """Raises ValueError naming the problem unless every value of the NumPy array x is
        finite and in ``support``."""
        if not np.isfinite(x).all():
            raise ValueError("the data contains NaN or inf")
        if self.support is not None and x.size:
            low, high = self.support
            if x.min() < low or x.max() > high:
                raise ValueError(
                    f"{self._support_message()}; got values in [{x.min():g}, {x.max():g}]"
                )


def _assert(condition, message):
    return tf.debugging.Assert(condition, [message])


class LogitBernoulli(tfd.Bernoulli):
    """``tfd.Bernoulli`` with log p(x) = x·ℓ − softplus(ℓ) for logits ℓ.

    TFP computes −(1 − x)·softplus(ℓ) − x·softplus(−ℓ), the same value for every x since
    softplus(ℓ) − softplus(−ℓ) = ℓ, with two softplus evaluations and two ``multiply_no_nan``
    so that ℓ = ±inf also works. A network's logits are finite, and where this distribution
    scores x (``score``, the exports, a user's own loop; training and the evaluation use
    ``bernoulli_log_prob``) they are its widest tensor, K × batch × pixels, so one softplus
    instead of two pays (benchmarks/likelihood_speed.py).
    """

    def _log_prob(self, event):
        if self.logits is None:  # made from probabilities: TFP's own formula
            return super()._log_prob(event)
        logits = tf.convert_to_tensor(self.logits)
        return tf.cast(event, logits.dtype) * logits - tf.math.softplus(logits)


@keras.saving.register_keras_serializable(package="keras_vae")
class BernoulliLikelihood(Likelihood):
    """p(x|z) = Π Bernoulli(x_i; sigmoid ℓ_i); the decoder outputs logits ℓ."""

    support = (0, 1)

    def __init__(self, name="bernoulli", **kwargs):
        super().__init__(name=name, **kwargs)

    def distribution(self, params):
        logits = ops.cast(params, "float32")
        return self._independent(LogitBernoulli(logits=logits, dtype=logits.dtype))

    def fused_log_prob(self, params, x):
        """log p(x|z) = Σ_i x_i ℓ_i − softplus ℓ_i, computed by ``bernoulli_log_prob`` on
        the events flattened to [..., D] (XLA reads an image's [..., H, W, C] layout more
        slowly)."""

        def flat(t):
            leading = tf.shape(t)[: len(t.shape) - self.event_ndims]
            return tf.reshape(t, tf.concat([leading, [self.event_size]], 0))

        return bernoulli_log_prob(flat(params), flat(x))


@tf.custom_gradient
def bernoulli_log_prob(logits, x):
    """Σ_i x_i ℓ_i − softplus ℓ_i over the last axis of logits [..., D] (x broadcast to
    them), its value by ``fused_bernoulli_log_prob`` under XLA, its gradient
    ∂/∂ℓ_i = x_i − sigmoid ℓ_i, ∂/∂x_i = ℓ_i by TensorFlow's kernels."""
    value = fused_bernoulli_log_prob(logits, x)

    def gradient(upstream):
        # XLA's own derivative of the grouped logs is slower (docs/benchmarks.md).
        ell = tf.cast(logits, tf.float32)
        upstream = upstream[..., None]
        d_logits = upstream * (tf.cast(x, tf.float32) - tf.sigmoid(ell))
        _, x_axes = tf.raw_ops.BroadcastGradientArgs(s0=tf.shape(logits), s1=tf.shape(x))
        d_x = tf.reshape(tf.reduce_sum(upstream * ell, x_axes), tf.shape(x))
        return tf.cast(d_logits, logits.dtype), tf.cast(d_x, x.dtype)

    return value, gradient


@tf.function(jit_compile=True)
def fused_bernoulli_log_prob(logits, x):
    """Σ_i x_i ℓ_i − relu ℓ_i − log(1 + e^−|ℓ_i|) over the last axis of logits [..., D]
    (x broadcast to them), with the last term summed as Σ_g log Π_{i∈g} (1 + e^−|ℓ_i|) over
    groups g of ``LOG_GROUP`` elements: one log per group instead of one per element, and
    each factor lies in (1, 2], so a product cannot overflow. Both sums are products with a
    vector of ones, which XLA's CPU backend runs as a vectorized matmul fed by the
    element-wise work, where a row ``reduce_sum`` adds one element at a time."""
    logits = tf.cast(logits, tf.float32)
    size = logits.shape[-1]
    leading = tf.shape(logits)[:-1]
    x = tf.reshape(tf.broadcast_to(tf.cast(x, tf.float32), tf.shape(logits)), [-1, size])
    logits = tf.reshape(logits, [-1, size])
    factors = tf.pad(
        1 + tf.exp(-tf.abs(logits)), [[0, 0], [0, -size % LOG_GROUP]], constant_values=1
    )
    factors = tf.reshape(factors, [-1, -(-size // LOG_GROUP), LOG_GROUP])
    log_terms = tf.math.log(tf.reduce_prod(factors, -1))
    linear = x * logits - tf.nn.relu(logits)
    total = row_sum(linear) - row_sum(log_terms)
    return tf.reshape(total, leading)


def row_sum(t):
    """Σ_j t_ij of a [N, M] tensor, as the matmul t · 1."""
    return tf.matmul(t, tf.ones((t.shape[-1], 1), t.dtype))[:, 0]


@keras.saving.register_keras_serializable(package="keras_vae")
class ContinuousBernoulliLikelihood(Likelihood):
    """p(x|z) = Π CB(x_i; λ_i) with logits ℓ = logit λ; normalized density on [0, 1]."""

    support = (0, 1)

    def __init__(self, name="continuous_bernoulli", **kwargs):
        super().__init__(name=name, **kwargs)

    def distribution(self, params):
        logits = ops.cast(params, "float32")
        return self._independent(tfd.ContinuousBernoulli(logits=logits, dtype=logits.dtype))


@keras.saving.register_keras_serializable(package="keras_vae")
class GaussianLikelihood(Likelihood):
    """p(x|z) = N(x; μ_θ(z), σ²I); the decoder outputs μ.

    ``learn_sigma``: ``"none"`` keeps σ = ``sigma``; ``"shared"`` learns one log σ;
    ``"per_pixel"`` learns one log σ per data element. Learned values start at ``sigma``.
    """

    # (x − μ)²/(2σ²) magnifies μ's rounding error by 1/σ², and a learned σ can become
    # smaller than a 16-bit μ's rounding error (bf16 rounds 0.3 to 0.30078).
    needs_float32_params = True

    def __init__(self, sigma=1.0, learn_sigma="none", name="gaussian", **kwargs):
        super().__init__(name=name, **kwargs)
        validate(DistributionsConfig(likelihood="gaussian", sigma=sigma, learn_sigma=learn_sigma))
        self.sigma = float(sigma)
        self.learn_sigma = learn_sigma

    def build(self, data_shape):
        if self.learn_sigma != "none":
            shape = () if self.learn_sigma == "shared" else tuple(data_shape)
            self.log_sigma = self.add_weight(
                name="log_sigma",
                shape=shape,
                initializer=keras.initializers.Constant(math.log(self.sigma)),
                dtype="float32",
                autocast=False,
            )
        super().build(data_shape)

    def scale(self):
        """σ, a scalar or one value per data element."""
        if self.learn_sigma == "none":
            return ops.convert_to_tensor(self.sigma, "float32")
        return ops.exp(ops.convert_to_tensor(self.log_sigma))

    def distribution(self, params):
        loc = ops.cast(params, "float32")
        return self._independent(tfd.Normal(loc=loc, scale=self.scale()))

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma, "learn_sigma": self.learn_sigma}
