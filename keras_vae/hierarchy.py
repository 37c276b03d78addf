"""Hierarchical latents: L stochastic layers z_1 (next to x), …, z_L (the top), laid out
side by side in the model's z = [z_1, …, z_L] ∈ R^d, d = Σ_l d_l.

- prior ``HierarchicalPrior``: p(z) = p(z_L) Π_{l<L} p(z_l | z_{l+1}), p(z_L) any
  registered prior over R^{d_L};
- posterior ``BottomUpPosterior``: q(z|x) = q(z_1|x) Π_{l>1} q(z_l | z_{l−1}) (the IWAE
  paper's two-layer model);
- posterior ``TopDownPosterior``: q(z|x) = q(z_L|x) Π_{l<L} q(z_l | z_{l+1}, x) (the
  VampPrior paper's HVAE): it draws z in the generative model's order;
- posterior ``LadderPosterior``: top-down like it, each q(z_l | z_{l+1}, x) the
  precision-weighted merge of a bottom-up estimate from x with the prior's own
  p(z_l | z_{l+1}) (the Ladder VAE), so that inference shares the generative path.

Each conditional factor is a diagonal Gaussian whose mean and log variance an MLP computes
(``GaussianLayer``). The decoder reads all of z. log q(z|x) and log p(z) are exact sums of
the layers' log densities, so the importance-weighted estimate of log p(x) stays exact;
KL(q ‖ p) has no closed form and is estimated by Monte Carlo.
"""

import itertools
import weakref

import keras
import tensorflow as tf
import tensorflow_probability as tfp
from keras import ops

from keras_vae import registry
from keras_vae.networks.layers import Dense, GatedDense, gate
from keras_vae.posteriors import gaussian
from keras_vae.sampling import Sampling

tfd = tfp.distributions


def check_layers(latent_layers, latent_dim):
    """``latent_layers`` as a tuple of ints, (latent_dim,) when empty; a ValueError unless
    each is >= 1 and they sum to ``latent_dim``."""
    sizes = tuple(int(n) for n in latent_layers) or (int(latent_dim),)
    if min(sizes) < 1 or sum(sizes) != latent_dim:
        raise ValueError(
            f"latent_layers {list(sizes)} must be sizes >= 1 that sum to latent_dim ({latent_dim})"
        )
    return sizes


class LayerChain(tfd.Distribution):
    """The distribution of z = [z_1, …, z_L] ([..., d]) whose layers are drawn one after
    another in ``order`` (indices into the layers, e.g. L−1, …, 0 top-down): the first from
    ``first`` (event shape [d_first]), each next z_l from ``conditional(l, z_prev)`` (a
    distribution with event shape [d_l]) given the layer drawn just before it, so that
    log p(z) = log first(z_first) + Σ log conditional(l, z_prev)(z_l)."""

    def __init__(self, first, conditional, sizes, order, name="LayerChain"):
        parameters = dict(locals())
        self.first = first
        self._conditional = conditional
        self.sizes = tuple(sizes)
        self.order = tuple(order)
        super().__init__(
            dtype=tf.float32,
            reparameterization_type=first.reparameterization_type,
            validate_args=False,
            allow_nan_stats=True,
            parameters=parameters,
            name=name,
        )

    def _event_shape(self):
        return tf.TensorShape([sum(self.sizes)])

    def _event_shape_tensor(self):
        return tf.constant([sum(self.sizes)], tf.int32)

    def _batch_shape(self):
        return self.first.batch_shape

    def _batch_shape_tensor(self):
        return self.first.batch_shape_tensor()

    def layer_log_probs(self, z):
        """log p(z_l | its parent) for the layers l = 1..L (the first layer's from
        ``first``), stacked [L, *z's batch shape]."""
        blocks = tf.split(z, self.sizes, axis=-1)
        log_probs = [None] * len(self.sizes)
        log_probs[self.order[0]] = self.first.log_prob(blocks[self.order[0]])
        for previous, layer in itertools.pairwise(self.order):
            log_probs[layer] = self._conditional(layer, blocks[previous]).log_prob(blocks[layer])
        # The first layer's log p has ``first``'s batch shape broadcast against z's, the
        # others z's: stacked at their common shape.
        shape = tf.shape(log_probs[0])
        for log_prob in log_probs[1:]:
            shape = tf.broadcast_dynamic_shape(shape, tf.shape(log_prob))
        return tf.stack([tf.broadcast_to(log_prob, shape) for log_prob in log_probs])

    def _log_prob(self, z):
        return tf.reduce_sum(self.layer_log_probs(z), axis=0)

    def _sample_n(self, n, seed=None):
        seeds = tfp.random.split_seed(seed, n=len(self.order))
        blocks = [None] * len(self.sizes)
        blocks[self.order[0]] = self.first.sample(n, seed=seeds[0])
        for layer_seed, (previous, layer) in zip(seeds[1:], itertools.pairwise(self.order)):
            blocks[layer] = self._conditional(layer, blocks[previous]).sample(seed=layer_seed)
        return tf.concat(blocks, axis=-1)


@keras.saving.register_keras_serializable(package="keras_vae")
class GaussianLayer(keras.layers.Layer):
    """(μ, log σ²) of a diagonal Gaussian over R^``units``, float32: an MLP of
    ``hidden_units`` on its input u, whose first layer also reads an optional context h
    (a(W u + V h + b), V h computed once per example however many samples u has), then a
    linear head. ``gated``: each hidden layer is a(W u + b) ⊙ sigmoid(W' u + b') (with
    the context in both halves), as in the gated_mlp family."""

    def __init__(self, units, hidden_units=(), activation="tanh", gated=False, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.hidden_units = tuple(int(n) for n in hidden_units)
        self.activation = activation
        self.activation_fn = keras.activations.get(activation)
        self.gated = bool(gated)

    def build(self, input_shape, context_shape=None):
        dtype = self.dtype_policy
        width = input_shape[-1]
        halves = 2 if self.gated else 1
        self.hidden = []
        for i, units in enumerate(self.hidden_units):
            layer = Dense(halves * units, dtype=dtype, name=f"hidden_{i}")
            layer.build((None, width))
            self.hidden.append(layer)
            width = units
        self.head = Dense(2 * self.units, dtype=dtype, name="head")
        self.head.build((None, width))
        self.context_dense = None
        if context_shape is not None:
            # The context joins the first hidden layer, or the head if there is none.
            joins = halves * self.hidden_units[0] if self.hidden_units else 2 * self.units
            self.context_dense = Dense(joins, use_bias=False, dtype=dtype, name="context")
            self.context_dense.build((None, context_shape[-1]))

    def call(self, inputs, context=None):
        """(μ, log σ²), each [..., units], for u [..., width] and h [batch, context width]
        (broadcast against u's leading axes)."""
        layers = [*self.hidden, self.head]
        h = inputs
        for i, layer in enumerate(layers):
            h = layer(h)
            if i == 0 and context is not None:
                h = h + self.context_dense(context)
            if layer is not self.head:
                units = self.hidden_units[i]
                h = gate(h, units, self.activation_fn) if self.gated else self.activation_fn(h)
        h = ops.cast(h, "float32")
        return h[..., : self.units], h[..., self.units :]

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "hidden_units": list(self.hidden_units),
            "activation": self.activation,
            "gated": self.gated,
        }


class HierarchicalPosterior(keras.layers.Layer):
    """The base of the hierarchical posteriors: the first layer drawn from the encoder's
    features h, each next one from a ``GaussianLayer`` (``layer_hidden_units``,
    ``layer_activation``, gated with ``layer_gated``) on the layer drawn before it (and,
    where ``reads_features``, on h), in ``order``; z_l = μ_l + σ_l ⊙ ε_l with the base
    noise ε ~ N(0, I) of all layers drawn at once by the ``Sampling`` layer. Subclasses
    define ``ordered(L)``, the order in which the L layers are drawn, and set
    ``reads_features``."""

    analytic_kl = False
    params_complete = False
    reads_features = False

    def __init__(
        self,
        latent_layers=(),
        layer_hidden_units=(100, 100),
        layer_activation="tanh",
        layer_gated=False,
        seed=None,
        name="posterior",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.latent_layers = tuple(int(n) for n in latent_layers)
        self.layer_hidden_units = tuple(int(n) for n in layer_hidden_units)
        self.layer_activation = layer_activation
        self.layer_gated = bool(layer_gated)
        self.seed = seed
        self.sampling = Sampling(seed=seed, dtype="float32", name="sampling")

    def _set_layers(self, latent_dim):
        """The layers' sizes, latent_dim and the order in which q draws them."""
        self.sizes = check_layers(self.latent_layers, latent_dim)
        self.latent_dim = int(latent_dim)
        self.order = self.ordered(len(self.sizes))

    def build(self, features_shape, latent_dim):
        self._set_layers(latent_dim)
        first = self.order[0]
        self.first = GaussianLayer(
            self.sizes[first], dtype=self.dtype_policy, name=f"q_{first + 1}"
        )
        self.first.build(features_shape)
        self.layers_after = {}
        for previous, layer in itertools.pairwise(self.order):
            net = GaussianLayer(
                self.sizes[layer],
                self.layer_hidden_units,
                self.layer_activation,
                self.layer_gated,
                dtype=self.dtype_policy,
                name=f"q_{layer + 1}",
            )
            net.build((None, self.sizes[previous]), features_shape if self.reads_features else None)
            self.layers_after[str(layer)] = net

    def call(self, features):
        """``z_mean``, ``z_log_var``: those of the layer drawn first (z_1 bottom-up, z_L
        top-down), the only one whose parameters are functions of x alone; with
        ``reads_features``, the ``features`` the later layers read."""
        mean, log_var = self.first(features)
        params = {"z_mean": mean, "z_log_var": log_var}
        if self.reads_features:
            params["features"] = ops.cast(features, "float32")
        return params

    def _layer(self, layer, z_previous, params):
        """(μ, log σ²) of q(z_layer | the layer before it (, x))."""
        return self.layers_after[str(layer)](z_previous, params.get("features"))

    def distribution(self, params):
        return LayerChain(
            gaussian(params["z_mean"], params["z_log_var"]),
            lambda layer, z_previous: gaussian(*self._layer(layer, z_previous, params)),
            self.sizes,
            self.order,
        )

    def sample_and_log_prob(self, params, num_samples, seed=None, epsilon=None):
        """z [K, batch, d] and log q(z|x) [K, batch], the sum of the layers' densities."""
        z, log_q = self.sample_and_layer_log_probs(params, num_samples, seed, epsilon)
        return z, ops.sum(log_q, axis=0)

    def sample_and_layer_log_probs(self, params, num_samples, seed=None, epsilon=None):
        """z [K, batch, d] drawn layer by layer in ``order``, and log q(z_l | its parent)
        for l = 1..L, stacked [L, K, batch]."""
        if epsilon is None:
            # At μ = 0, log σ² = 0 the Sampling layer returns its base noise ε [K, batch, d].
            zeros = ops.zeros((ops.shape(params["z_mean"])[0], self.latent_dim), "float32")
            epsilon = self.sampling((zeros, zeros), num_samples=num_samples, seed=seed)
        noise = tf.split(ops.convert_to_tensor(epsilon, "float32"), self.sizes, axis=-1)
        blocks, log_q = [None] * len(self.sizes), [None] * len(self.sizes)
        previous = None
        for layer in self.order:
            if previous is None:
                mean, log_var = params["z_mean"], params["z_log_var"]
            else:
                mean, log_var = self._layer(layer, blocks[previous], params)
            blocks[layer] = mean + ops.exp(0.5 * log_var) * noise[layer]
            log_q[layer] = gaussian(mean, log_var).log_prob(blocks[layer])
            previous = layer
        return ops.concatenate(blocks, axis=-1), ops.stack(log_q)

    def sample(self, params, num_samples, seed=None, epsilon=None):
        return self.sample_and_log_prob(params, num_samples, seed, epsilon)[0]

    def mean(self, params):
        """z at ε = 0: each layer at its conditional mean given the layer before it."""
        zero = ops.zeros((1, 1, self.latent_dim), "float32")
        return self.sample(params, 1, epsilon=zero)[0]

    def marginals(self, params):
        return None

    def get_config(self):
        return {
            **super().get_config(),
            "latent_layers": list(self.latent_layers),
            "layer_hidden_units": list(self.layer_hidden_units),
            "layer_activation": self.layer_activation,
            "layer_gated": self.layer_gated,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="keras_vae")
class BottomUpPosterior(HierarchicalPosterior):
    """q(z|x) = q(z_1|x) Π_{l>1} q(z_l | z_{l−1}): z_1 from the encoder's features, each
    higher layer from the one below it."""

    @staticmethod
    def ordered(num_layers):
        return tuple(range(num_layers))


@keras.saving.register_keras_serializable(package="keras_vae")
class TopDownPosterior(HierarchicalPosterior):
    """q(z|x) = q(z_L|x) Π_{l<L} q(z_l | z_{l+1}, x): z_L from the encoder's features,
    each lower layer from the one above it and the features, in the prior's order."""

    reads_features = True
    top_down = True

    @staticmethod
    def ordered(num_layers):
        return tuple(reversed(range(num_layers)))


@keras.saving.register_keras_serializable(package="keras_vae")
class LadderPosterior(TopDownPosterior):
    """The Ladder VAE's posterior (Sønderby et al., 2016). A bottom-up pass, h_1 the
    encoder's features and h_l an MLP (``layer_hidden_units``; ``GatedDense`` layers with
    ``layer_gated``) of h_{l−1}, gives each layer an estimate N(μ̂_l, σ̂_l²) (linear heads on
    h_l); then top-down q(z_L|x) = N(μ̂_L, σ̂_L²) and q(z_l | z_{l+1}, x) ∝ N(z_l; μ̂_l, σ̂_l²)
    p(z_l | z_{l+1}), the precision-weighted merge with the model's hierarchical prior:

        σ_l⁻² = σ̂_l⁻² + σ_p⁻²,   μ_l = σ_l² (μ̂_l σ̂_l⁻² + μ_p σ_p⁻²),

    (μ_p, σ_p²) those of p(z_l | z_{l+1}). The prior's networks are shared, not copied: the
    model attaches its prior (``reads_prior``), which must be a ``HierarchicalPrior`` over
    the same layers. The parameters (``call``) are every layer's (μ̂_l, log σ̂_l²), functions
    of x alone."""

    reads_features = False
    reads_prior = True

    def build(self, features_shape, latent_dim):
        self._set_layers(latent_dim)
        dtype = self.dtype_policy
        self.deterministic, self.estimates = [], []
        shape = tuple(features_shape)
        for layer, size in enumerate(self.sizes):
            if layer > 0:  # h_l = MLP(h_{l−1})
                mlp = []
                hidden_layer = GatedDense if self.layer_gated else Dense
                for i, units in enumerate(self.layer_hidden_units):
                    dense = hidden_layer(
                        units,
                        activation=self.layer_activation,
                        dtype=dtype,
                        name=f"h_{layer + 1}_{i}",
                    )
                    dense.build(shape)
                    mlp.append(dense)
                    shape = (None, units)
                self.deterministic.append(mlp)
            estimate = GaussianLayer(size, dtype=dtype, name=f"estimate_{layer + 1}")
            estimate.build(shape)
            self.estimates.append(estimate)

    def attach(self, prior):
        """Reads p(z_l | z_{l+1}) from ``prior``, which the model owns and saves."""
        if getattr(prior, "sizes", None) != self.sizes or not hasattr(prior, "conditional"):
            raise ValueError(
                f"the ladder posterior merges with the prior's p(z_l|z_l+1): it needs "
                f"prior='hierarchical' over the same latent_layers {list(self.sizes)}; got "
                f"{type(prior).__name__}."
            )
        self._prior = weakref.ref(prior)

    def call(self, features):
        params = {}
        h = features
        for layer, estimate in enumerate(self.estimates):
            if layer > 0:
                for dense in self.deterministic[layer - 1]:
                    h = dense(h)
            mean, log_var = estimate(h)
            top = layer == len(self.sizes) - 1
            params["z_mean" if top else f"z_mean_{layer + 1}"] = mean
            params["z_log_var" if top else f"z_log_var_{layer + 1}"] = log_var
        return params

    def _layer(self, layer, z_previous, params):
        """(μ, log σ²) of the merge of N(μ̂_l, σ̂_l²) with p(z_l | z_{l+1})."""
        prior = self._prior()
        if prior is None:
            raise RuntimeError("the ladder posterior's model, whose prior it reads, is gone")
        prior_mean, prior_log_var = prior.conditional(layer, z_previous)
        mean, log_var = params[f"z_mean_{layer + 1}"], params[f"z_log_var_{layer + 1}"]
        # σ̂⁻²/(σ̂⁻² + σ_p⁻²) = sigmoid(log σ_p² − log σ̂²): no precision is formed, so none
        # overflows.
        merged_mean = mean * ops.sigmoid(prior_log_var - log_var) + prior_mean * ops.sigmoid(
            log_var - prior_log_var
        )
        return merged_mean, -ops.logaddexp(-log_var, -prior_log_var)


@keras.saving.register_keras_serializable(package="keras_vae")
class HierarchicalPrior(keras.layers.Layer):
    """p(z) = p(z_L) Π_{l<L} p(z_l | z_{l+1}): p(z_L) the registered prior ``top_prior``
    over R^{d_L} (made with ``num_components`` and ``seed``, where it takes them), each
    p(z_l | z_{l+1}) a diagonal Gaussian from a ``GaussianLayer`` on z_{l+1}. A top prior
    built from the posterior (the VampPrior) reads q(z_L|x) of a top-down posterior."""

    analytic_kl = False
    posterior_requirement = (
        "a top-down posterior (top_down or ladder), whose q(z_L|x) its top prior reads"
    )

    def __init__(
        self,
        latent_layers=(),
        layer_hidden_units=(100, 100),
        layer_activation="tanh",
        layer_gated=False,
        top_prior="standard_normal",
        num_components=10,
        seed=None,
        name="prior",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.latent_layers = tuple(int(n) for n in latent_layers)
        self.layer_hidden_units = tuple(int(n) for n in layer_hidden_units)
        self.layer_activation = layer_activation
        self.layer_gated = bool(layer_gated)
        self.top_prior = top_prior
        self.num_components = int(num_components)
        self.seed = seed
        if top_prior == "hierarchical":
            raise ValueError("top_prior cannot be 'hierarchical': it is a prior over z_L")
        self.top = registry.make(
            "prior", top_prior, {"num_components": num_components, "seed": seed}, name="top"
        )

    @property
    def reads_condition(self):
        return self.top.reads_condition

    @property
    def reads_posterior(self):
        return self.top.reads_posterior

    def can_read(self, posterior):
        return getattr(posterior, "top_down", False)

    def build(self, latent_shape, data_shape=None, condition_dim=0):
        latent_dim = int(latent_shape[-1])
        self.sizes = check_layers(self.latent_layers, latent_dim)
        self.top.build((self.sizes[-1],), data_shape, condition_dim)
        self.layers_below = {}
        for layer in range(len(self.sizes) - 1):
            net = GaussianLayer(
                self.sizes[layer],
                self.layer_hidden_units,
                self.layer_activation,
                self.layer_gated,
                dtype="float32",
                name=f"p_{layer + 1}",
            )
            net.build((None, self.sizes[layer + 1]))
            self.layers_below[str(layer)] = net

    def conditional(self, layer, z_above):
        """(μ, log σ²) of p(z_layer | z_{layer+1}) (0-based ``layer`` < L − 1)."""
        return self.layers_below[str(layer)](z_above)

    def distribution(self, posterior_at=None, c=None):
        """p(z), drawn top-down: z_L from the top prior (given c(y) if it reads it), then
        z_l ~ p(z_l | z_{l+1})."""
        if self.top.reads_posterior:
            # A top-down posterior draws z_L first: its first factor is q(z_L|x).
            top = self.top.distribution(lambda x: posterior_at(x).first, c)
        else:
            top = self.top.distribution(posterior_at, c)
        return LayerChain(
            top,
            lambda layer, z_above: gaussian(*self.conditional(layer, z_above)),
            self.sizes,
            tuple(reversed(range(len(self.sizes)))),
        )

    def marginals(self, c=None):
        return None

    def get_config(self):
        return {
            **super().get_config(),
            "latent_layers": list(self.latent_layers),
            "layer_hidden_units": list(self.layer_hidden_units),
            "layer_activation": self.layer_activation,
            "layer_gated": self.layer_gated,
            "top_prior": self.top_prior,
            "num_components": self.num_components,
            "seed": self.seed,
        }
