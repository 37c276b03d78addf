"""The inverse autoregressive flow posterior (Kingma et al., 2016): the diagonal Gaussian
followed by T autoregressive affine steps conditioned on the encoder's features."""

import functools
import itertools
import math

import keras
import numpy as np
import tensorflow_probability as tfp
from keras import ops

from keras_vae.networks.made import made_degrees
from keras_vae.posteriors import DiagonalGaussian

tfb = tfp.bijectors
tfd = tfp.distributions

GATE_EPSILON = 0.5  # σ ∈ (0, 1 + ε); σ = 1 at r = 0


@keras.saving.register_keras_serializable(package="keras_vae")
class AutoregressiveStep(keras.layers.Layer):
    """One step of the gated update z' = σ ⊙ z + (1 − σ) ⊙ m (Kingma et al., 2016, the
    numerically stable form), given as the (shift, log_scale) of TFP's masked autoregressive
    flow, z' = (z − shift) ⊙ exp(−log_scale): log_scale = −log σ, shift = −(1 − σ) ⊙ m / σ.

    m and the gate's pre-activation r come from a MADE over z ∈ R^d whose hidden layers
    also read the context h, h_1 = a(M_1⊙W_1 z + V_1 h + b_1), h_l = a(M_l⊙W_l h_{l−1} +
    V_l h + b_l), m = M_o⊙W_o h_L + b_o, r = M_o⊙U_o h_L + c_o, so that both at i depend
    on the z before z_i only; σ = (1 + ε) sigmoid(log(1/ε) + 8 tanh(r/8)) with ε = ½, in
    (0.001, 1.5): a step shrinks z toward m, or stretches it by at most 1.5. With
    ``reverse`` the order is z_d, …, z_1. The output weights start at zero, where σ = 1:
    the step starts as the identity."""

    def __init__(self, hidden_units=(320,), activation="elu", reverse=False, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units = tuple(int(n) for n in hidden_units)
        self.activation_name = activation
        self.activation = keras.activations.get(activation)
        self.reverse = bool(reverse)
        self.seed = seed

    def build(self, latent_dim, context_dim):
        d = int(latent_dim)
        # z_i's place in the autoregressive order: i, or d + 1 − i with ``reverse``.
        order = np.arange(d, 0, -1) if self.reverse else np.arange(1, d + 1)
        degrees = [order] + [made_degrees(n, d) for n in self.hidden_units]
        # Hidden unit k sees the z_j of order ≤ m_k; output i those units with m_k < its order.
        self._masks = [
            (later[None, :] >= earlier[:, None]).astype("float32")
            for earlier, later in itertools.pairwise(degrees)
        ]
        self._output_mask = (order[None, :] > degrees[-1][:, None]).astype("float32")
        seeds = np.random.default_rng(self.seed).integers(0, 2**31, size=len(self.hidden_units))
        widths = (d,) + self.hidden_units
        self.kernels, self.context_kernels, self.biases = [], [], []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            init = keras.initializers.GlorotUniform(seed=int(seeds[i]))
            self.kernels.append(self.add_weight(shape=(fan_in, fan_out), initializer=init))
            self.context_kernels.append(
                self.add_weight(shape=(int(context_dim), fan_out), initializer=init)
            )
            self.biases.append(self.add_weight(shape=(fan_out,), initializer="zeros"))
        self.mean_kernel = self.add_weight(shape=(widths[-1], d), initializer="zeros")
        self.mean_bias = self.add_weight(shape=(d,), initializer="zeros")
        self.gate_kernel = self.add_weight(shape=(widths[-1], d), initializer="zeros")
        self.gate_bias = self.add_weight(shape=(d,), initializer="zeros")

    def call(self, z, context):
        """z [..., n, d] and h [n, context_dim] → (shift, log_scale), each [..., n, d]."""
        h = z
        for kernel, mask, context_kernel, bias in zip(
            self.kernels, self._masks, self.context_kernels, self.biases
        ):
            h = self.activation(
                ops.matmul(h, kernel * mask) + ops.matmul(context, context_kernel) + bias
            )
        m = ops.matmul(h, self.mean_kernel * self._output_mask) + self.mean_bias
        r = ops.matmul(h, self.gate_kernel * self._output_mask) + self.gate_bias
        # A stretch of at most 1.5 per step keeps a wide z_0 from being amplified into the
        # prior's far tail; the soft bound on r keeps 1/σ finite.
        log_sigma = math.log(1 + GATE_EPSILON) + ops.log_sigmoid(
            -math.log(GATE_EPSILON) + 8.0 * ops.tanh(r / 8.0)
        )
        return -m * ops.expm1(-log_sigma), -log_sigma

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_units": list(self.hidden_units),
            "activation": self.activation_name,
            "reverse": self.reverse,
            "seed": self.seed,
            "update": "gated",
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.pop("update", None) != "gated":
            # Same weights, another meaning: loading them would silently give another q.
            raise ValueError(
                "this IAF step's config lacks update='gated': its weights belong to "
                "z' = (z − shift) ⊙ exp(−log_scale), not to this gated step; retrain the model"
            )
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_vae")
class IAFPosterior(keras.layers.Layer):
    """q_φ(z|x): z_0 = μ_φ(x) + σ_φ(x) ⊙ ε (``DiagonalGaussian``), then for t = 1..T
    z_t = σ_t ⊙ z_{t−1} + (1 − σ_t) ⊙ m_t (``AutoregressiveStep``), (σ_t, m_t)
    autoregressive in z_{t−1} and conditioned on the encoder's features h, in the order
    z_1..z_d for odd t and z_d..z_1 for even t. The Jacobian is triangular, so

        log q_φ(z_T|x) = log N(z_0; μ, diag σ²) − Σ_t Σ_i log σ_{t,i}

    exactly. Each step is TFP's ``Invert(MaskedAutoregressiveFlow)``: one network pass
    per step to sample (and to score a z the posterior drew), D sequential passes to
    score any other z. The steps start as the identity: an untrained flow is the
    diagonal Gaussian, and so is T = 0.
    """

    analytic_kl = False
    params_complete = False

    def __init__(
        self,
        flow_steps=2,
        flow_hidden_units=(320,),
        activation="elu",
        seed=None,
        name="posterior",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.flow_steps = int(flow_steps)
        self.flow_hidden_units = tuple(int(n) for n in flow_hidden_units)
        self.activation = activation
        self.seed = seed
        if self.flow_steps < 0:
            raise ValueError(f"flow_steps must be >= 0; got {flow_steps}")
        if not self.flow_hidden_units or min(self.flow_hidden_units) < 1:
            raise ValueError(
                f"flow_hidden_units must have at least one width, each >= 1; "
                f"got {flow_hidden_units}"
            )
        self.gaussian = DiagonalGaussian(seed=seed, dtype=self.dtype_policy, name="gaussian")
        # The flow is float32 whatever the policy, so that log q stays exact.
        self.steps = [
            AutoregressiveStep(
                self.flow_hidden_units,
                activation,
                reverse=t % 2 == 1,
                seed=None if seed is None else seed + 1 + t,
                dtype="float32",
                name=f"flow_{t}",
            )
            for t in range(self.flow_steps)
        ]

    def build(self, features_shape, latent_dim):
        self.gaussian.build(features_shape, latent_dim)
        for step in self.steps:
            step.build(latent_dim, features_shape[-1])

    def call(self, features):
        return {**self.gaussian(features), "features": ops.cast(features, "float32")}

    def bijector(self, params):
        """The flow z_0 ↦ z_T for the examples of ``params``."""
        steps = [
            tfb.Invert(
                tfb.MaskedAutoregressiveFlow(functools.partial(step, context=params["features"]))
            )
            for step in self.steps
        ]
        return tfb.Chain(steps[::-1])  # Chain applies its last bijector first

    def distribution(self, params):
        return tfd.TransformedDistribution(
            self.gaussian.distribution(params), self.bijector(params)
        )

    def sample(self, params, num_samples, seed=None, epsilon=None):
        """z_T [K, batch, d]: the flow of the Gaussian's draws z_0 = μ + σ ⊙ ε."""
        return self.bijector(params).forward(
            self.gaussian.sample(params, num_samples, seed=seed, epsilon=epsilon)
        )

    def sample_and_log_prob(self, params, num_samples, seed=None, epsilon=None):
        """(z_T, log q_φ(z_T|x)) with log q = log N(z_0; μ, diag σ²) − log |det ∂z_T/∂z_0|,
        one network pass per step."""
        z0, log_q0 = self.gaussian.sample_and_log_prob(params, num_samples, seed, epsilon)
        flow = self.bijector(params)
        return flow.forward(z0), log_q0 - flow.forward_log_det_jacobian(z0, event_ndims=1)

    def mean(self, params):
        """The flow of μ (z_T at ε = 0): the point the model reconstructs x at."""
        return self.bijector(params).forward(params["z_mean"])

    def marginals(self, params):
        return None

    def get_config(self):
        return {
            **super().get_config(),
            "flow_steps": self.flow_steps,
            "flow_hidden_units": list(self.flow_hidden_units),
            "activation": self.activation,
            "seed": self.seed,
        }
