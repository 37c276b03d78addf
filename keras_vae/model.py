"""The variational autoencoder: p(z) p_θ(x|z) with encoder q_φ(z|x) = N(μ_φ(x), diag σ²_φ(x)).

Per example, in nats:
    reconstruction_loss = −E_q[log p_θ(x|z)]            (Monte Carlo, z = μ + σ ⊙ ε)
    kl_loss             = KL(q_φ(z|x) ‖ p(z))             (closed form, or Monte Carlo)
    elbo                = −reconstruction_loss − kl_loss  (≤ log p_θ(x))
    loss                = reconstruction_loss + β kl_loss             (objective "elbo")
                        = −log (1/K) Σ_k p(x|z_k) p(z_k)^β / q(z_k|x)^β (objective "iwae")
"""

import math

import keras
import tensorflow as tf
import tensorflow_probability as tfp
from keras import ops

from keras_vae.likelihoods import get_likelihood
from keras_vae.networks import AUTOREGRESSIVE, Dense, build_networks
from keras_vae.sampling import Sampling

tfd = tfp.distributions

KL_ESTIMATORS = ("analytic", "mc")
OBJECTIVES = ("elbo", "iwae")
GRADIENT_ESTIMATORS = ("reparam", "dreg")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {choices}.")


@keras.saving.register_keras_serializable(package="keras_vae")
class VAE(keras.Model):
    """A VAE trained with ``model.fit`` on batches of x (labels, if present, are ignored).

    Args:
        data_shape: shape of one example, e.g. ``(28, 28, 1)`` or ``(64,)``.
        latent_dim: d, the size of z.
        architecture: encoder/decoder family, ``"mlp"``, ``"conv"``, ``"made"`` (an MLP
            encoder and an autoregressive decoder p_θ(x|z) = Π_d p(x_d | x_<d, z); Bernoulli
            likelihood only; see ``networks``) or ``"pixelcnn_made"`` (the same, with
            masked convolutions of x_<d of widths ``filters``).
        hidden_units, filters, activation: widths and nonlinearity of the networks.
        dropout: rate of dropout on the decoder's hidden units while training (0: none).
        likelihood: ``"bernoulli"``, ``"continuous_bernoulli"`` or ``"gaussian"``.
        sigma, learn_sigma: the Gaussian likelihood's σ and whether/how it is learned.
        beta: weight β on the KL term.
        kl_warmup_steps: β rises linearly from β/steps to β over this many optimizer steps
            (KL annealing); 0 turns warm-up off.
        kl: ``"analytic"`` (closed form ½Σ(σ²+μ²−1−log σ²)) or ``"mc"`` (Monte Carlo).
        objective: ``"elbo"`` or ``"iwae"`` (the importance-weighted bound).
        num_samples: K, the samples of z per example in the training objective.
        gradient_estimator: how the encoder's gradient of the IWAE bound is estimated:
            ``"reparam"`` differentiates the bound through z = μ + σ ⊙ ε and through q's
            parameters in log q_φ(z|x); ``"dreg"`` (objective ``"iwae"`` only) is the doubly
            reparameterized estimator of Tucker et al. (2019), Σ_k w̃_k² ∂log w_k/∂z_k ·
            ∂z_k/∂φ for β = 1, with the same expectation, typically lower variance, and a
            signal-to-noise ratio that does not fall as K grows. The decoder's gradient is
            the same for both.
        seed: seed of the sampling noise.
        check_inputs: assert that every batch is finite and in the likelihood's support.
            XLA drops assertions, so ``compile`` leaves XLA off unless ``jit_compile=True``
            is asked for; then check the data before ``fit`` (``check_data``).
        dtype: the networks' dtype policy, e.g. ``"mixed_float16"`` or ``"mixed_bfloat16"``
            on GPUs; sampling, distributions and losses are float32 in any case.
    """

    def __init__(
        self,
        data_shape,
        latent_dim=16,
        architecture="mlp",
        hidden_units=(512, 256),
        filters=(32, 64),
        activation="relu",
        dropout=0.0,
        likelihood="bernoulli",
        sigma=1.0,
        learn_sigma="none",
        beta=1.0,
        kl_warmup_steps=0,
        kl="analytic",
        objective="elbo",
        num_samples=1,
        gradient_estimator="reparam",
        seed=None,
        check_inputs=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_choice("kl estimator", kl, KL_ESTIMATORS)
        _check_choice("objective", objective, OBJECTIVES)
        _check_choice("gradient estimator", gradient_estimator, GRADIENT_ESTIMATORS)
        if gradient_estimator == "dreg" and objective != "iwae":
            raise ValueError("gradient_estimator='dreg' estimates the IWAE bound's gradient: "
                             f"it needs objective='iwae', got {objective!r}.")
        if architecture in AUTOREGRESSIVE and likelihood != "bernoulli":
            raise ValueError(
                f"architecture {architecture!r} models binary data: it needs likelihood='bernoulli', "
                f"got {likelihood!r}.")
        if int(latent_dim) < 1 or int(num_samples) < 1:
            raise ValueError(
                f"latent_dim and num_samples must be positive; got {latent_dim}, {num_samples}."
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}.")
        if not (0 <= beta < math.inf and 0 <= kl_warmup_steps < math.inf):
            raise ValueError(
                f"beta and kl_warmup_steps must be finite and >= 0; got {beta}, "
                f"{kl_warmup_steps}.")
        self.data_shape = tuple(int(n) for n in data_shape)
        self.latent_dim = int(latent_dim)
        self.architecture = architecture
        self.hidden_units = tuple(int(n) for n in hidden_units)
        self.filters = tuple(int(n) for n in filters)
        self.activation = activation
        self.dropout = float(dropout)
        self.likelihood_name = likelihood
        self.sigma = float(sigma)
        self.learn_sigma = learn_sigma
        self.beta = float(beta)
        self.kl_warmup_steps = int(kl_warmup_steps)
        self.kl = kl
        self.objective = objective
        self.num_samples = int(num_samples)
        self.gradient_estimator = gradient_estimator
        self.seed = seed
        self.check_inputs = bool(check_inputs)

        # Made first, but tracked (assigned) after the networks and the sampler as before,
        # so that the weights, and the optimizer's variables, keep their order.
        likelihood_layer = get_likelihood(likelihood, sigma=sigma, learn_sigma=learn_sigma)
        # The networks compute in the model's dtype policy (e.g. dtype="mixed_float16"),
        # the decoder's output layer too unless the likelihood needs float32 parameters;
        # the sampler, the distributions and the loss stay in float32.
        policy = self.dtype_policy
        self.encoder_network, self.decoder_network = build_networks(
            architecture, self.data_shape, self.latent_dim, self.hidden_units, self.filters,
            activation, dtype=policy, dropout=self.dropout, seed=seed,
            output_dtype="float32" if likelihood_layer.needs_float32_params else None,
        )
        self.z_mean_head = Dense(self.latent_dim, name="z_mean", dtype=policy)
        self.z_log_var_head = Dense(self.latent_dim, name="z_log_var", dtype=policy)
        self.sampling = Sampling(seed=seed, dtype="float32", name="sampling")
        self.likelihood = likelihood_layer

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")
        self.elbo_tracker = keras.metrics.Mean(name="elbo")
        # Built now, so that save/export work even if fit never calls self(x).
        self.build((None,) + self.data_shape)

    def build(self, input_shape):
        features = self.encoder_network.compute_output_shape(tuple(input_shape))
        self.z_mean_head.build(features)
        self.z_log_var_head.build(features)
        self.likelihood.build(self.data_shape)
        if self.autoregressive:
            self.decoder_network.build()
        self.built = True

    @property
    def autoregressive(self):
        """Whether the parameter of x_d depends on x_<d as well as z (architectures "made",
        "pixelcnn_made")."""
        return self.architecture in AUTOREGRESSIVE

    def compile(self, *args, jit_compile="auto", **kwargs):
        """``keras.Model.compile``; ``jit_compile="auto"`` means no XLA while ``check_inputs``
        is on, since XLA would silently drop the input checks."""
        if jit_compile == "auto" and self.check_inputs:
            jit_compile = False
        super().compile(*args, jit_compile=jit_compile, **kwargs)

    def compile_from_config(self, config):
        # Keras skips this for models that override compile(); it is the base version.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def check_data(self, x):
        """Raises ValueError naming the problem unless x (e.g. a whole training array) has
        the model's data shape and every value is finite and in the likelihood's support."""
        x = ops.convert_to_tensor(x, "float32")
        self._check_shape(x)
        try:
            self.likelihood.check_support(x)
        except tf.errors.InvalidArgumentError as error:
            # The assertion's message, without TensorFlow's quoting of it ("b'...'").
            message = error.message[error.message.find("keras_vae:"):]
            raise ValueError(message.split("\n")[0].split("'")[0].split(" [Op:")[0]) from None

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            self.reconstruction_loss_tracker,
            self.kl_loss_tracker,
            self.elbo_tracker,
        ]

    # ------------------------------------------------------------------ distributions
    def prior(self):
        """p(z) = N(0, I)."""
        return tfd.MultivariateNormalDiag(loc=ops.zeros((self.latent_dim,), "float32"))

    def encode_params(self, x, training=False):
        """(μ_φ(x), log σ²_φ(x)), each [batch, d], in float32."""
        self._check_shape(x)
        features = self.encoder_network(x, training=training)
        z_mean = ops.cast(self.z_mean_head(features), "float32")
        z_log_var = ops.cast(self.z_log_var_head(features), "float32")
        return z_mean, z_log_var

    def posterior(self, z_mean, z_log_var):
        """q_φ(z|x) = N(μ, diag σ²) from its parameters."""
        return tfd.MultivariateNormalDiag(loc=z_mean, scale_diag=ops.exp(0.5 * z_log_var))

    def encode(self, x, training=False):
        """q_φ(z|x) as a TFP ``MultivariateNormalDiag`` with batch shape [batch]."""
        return self.posterior(*self.encode_params(self._checked(x), training=training))

    def decode(self, z, x=None, noise=None, training=False):
        """p_θ(x|z) for z of shape [..., d]; batch shape [...], event shape ``data_shape``.

        An autoregressive decoder's factor of x_d is p(x_d | x_<d, z), so it needs the
        x_<d it is conditioned on. With ``x`` ([batch, *data_shape], z [..., batch, d]) they
        are x's own: ``log_prob(x)`` is then log p_θ(x|z) exactly (and only at that x).
        Without ``x`` (z [n, d]) they are drawn one element at a time, x_d = 1[u_d < p_d]
        for uniform ``noise`` u ([n, *data_shape]): a sample x ~ p_θ(x|z), or with
        ``noise=None`` (u = ½) the greedy path x_d = 1[p_d > ½]; the distribution returned
        has the factors along that path (D + 1 decoder passes in all). A factorized decoder
        ignores ``x`` and ``noise``.
        """
        z = ops.convert_to_tensor(z, "float32")
        if self.autoregressive:
            if x is None:
                x = self._draw(z, noise)
            return self.likelihood.distribution(
                self.decoder_network(z, ops.convert_to_tensor(x, "float32"),
                                     training=training))
        leading = ops.shape(z)[:-1]
        # The networks take [n, d]; K samples per example arrive as [K, batch, d].
        params = self.decoder_network(ops.reshape(z, (-1, self.latent_dim)), training=training)
        params = ops.reshape(params, tuple(leading) + self.data_shape)
        return self.likelihood.distribution(params)

    def _draw(self, z, noise):
        """x ~ p_θ(x|z) element by element (see ``decode``): D passes of the decoder, the
        d-th fixing x_d, which no later pass changes since ℓ_d reads x_<d only."""
        if len(z.shape) != 2:
            raise ValueError(
                f"Drawing x from the autoregressive decoder takes z of shape (n, "
                f"{self.latent_dim}); got shape {tuple(z.shape)}.")
        n, size = ops.shape(z)[0], math.prod(self.data_shape)
        u = 0.5 if noise is None else ops.reshape(ops.cast(noise, "float32"), (n, size))

        def draw_element(d, x):
            logits = ops.reshape(
                self.decoder_network(z, ops.reshape(x, (n,) + self.data_shape)), (n, size))
            one_hot = ops.one_hot(d, size)
            p_d = ops.sum(ops.sigmoid(logits) * one_hot, axis=1, keepdims=True)
            u_d = u if noise is None else ops.sum(u * one_hot, axis=1, keepdims=True)
            return x + ops.cast(u_d < p_d, "float32") * one_hot

        x = ops.fori_loop(0, size, draw_element, ops.zeros((n, size), "float32"))
        return ops.reshape(x, (n,) + self.data_shape)

    # ------------------------------------------------------------------ objective
    def current_beta(self):
        """β, scaled by min(1, step / kl_warmup_steps) during KL warm-up."""
        if self.kl_warmup_steps == 0 or self.optimizer is None:
            return ops.convert_to_tensor(self.beta, "float32")
        step = ops.cast(self.optimizer.iterations + 1, "float32")
        return self.beta * ops.minimum(1.0, step / self.kl_warmup_steps)

    def log_weights(self, x, num_samples=1, training=False, seed=None, epsilon=None,
                    densities=True):
        """For z_k ~ q_φ(z|x), k = 1..K: the [K, batch] tensors log p_θ(x|z_k), log p(z_k),
        log q_φ(z_k|x), and the closed-form KL(q_φ(z|x) ‖ p(z)) of shape [batch].

        ``epsilon`` ([K, batch or 1, d]) fixes the noise of z_k = μ + σ ⊙ ε_k. With
        ``densities=False`` log p(z_k) and log q_φ(z_k|x) are not computed (None).
        """
        return self._sample_log_weights(x, num_samples, training, seed, epsilon,
                                        densities)[1:]

    def _sample_log_weights(self, x, num_samples, training, seed=None, epsilon=None,
                            densities=True, stop_posterior=False):
        """``log_weights`` preceded by the samples z [K, batch, d]; with ``stop_posterior``,
        log q(z_k|x) is differentiable in z_k only, not in q's parameters (μ, σ)."""
        x = self._checked(x)
        z_mean, z_log_var = self.encode_params(x, training=training)
        posterior = self.posterior(z_mean, z_log_var)
        prior = self.prior()
        z = self.sampling(
            (z_mean, z_log_var), num_samples=num_samples, seed=seed, epsilon=epsilon)
        log_px_z = self.decode(z, x, training=training).log_prob(x)
        kl = tfd.kl_divergence(posterior, prior)
        if not densities:
            return z, log_px_z, None, None, kl
        if stop_posterior:
            posterior = self.posterior(ops.stop_gradient(z_mean),
                                       ops.stop_gradient(z_log_var))
        return z, log_px_z, prior.log_prob(z), posterior.log_prob(z), kl

    def _kl_estimate(self, log_pz, log_qz, kl_analytic):
        if self.kl == "analytic":
            return kl_analytic
        return ops.mean(log_qz - log_pz, axis=0)

    def compute_terms(self, x, training=False, beta=None, seed=None):
        """Per-example (shape [batch]) ``loss``, ``reconstruction_loss``, ``kl_loss``, ``elbo``,
        with the model's K samples, KL estimator, objective and β (default: current β).

        With ``gradient_estimator="dreg"`` and ``training``, log q_φ(z|x) in ``loss`` is
        stopped in q's parameters: its value is the IWAE loss, but its gradient is DReG's
        only as ``compute_gradients`` takes it."""
        beta = self.current_beta() if beta is None else beta
        dreg = training and self.gradient_estimator == "dreg"
        z, log_px_z, log_pz, log_qz, kl_analytic = self._sample_log_weights(
            x, self.num_samples, training, seed,
            densities=self.kl == "mc" or self.objective == "iwae", stop_posterior=dreg)
        reconstruction_loss = -ops.mean(log_px_z, axis=0)
        kl_loss = self._kl_estimate(log_pz, log_qz, kl_analytic)
        if self.objective == "elbo":
            loss = reconstruction_loss + beta * kl_loss
        else:
            log_w = log_px_z + beta * (log_pz - log_qz)
            loss = -log_mean_exp(log_w)
        terms = {
            "loss": loss,
            "reconstruction_loss": reconstruction_loss,
            "kl_loss": kl_loss,
            "elbo": -reconstruction_loss - kl_loss,
        }
        if dreg:  # what train_step needs to reweight the gradient that reaches z
            terms.update(z=z, log_w=log_w, beta=beta)
        return terms

    # ------------------------------------------------------------------ Keras hooks
    def call(self, x, training=False):
        """The reconstruction E[x | z = μ_φ(x)] (probabilities for Bernoulli); for an
        autoregressive decoder, each element's E[x_d | x_<d, z = μ_φ(x)]."""
        x = self._checked(x)
        z_mean, _ = self.encode_params(x, training=training)
        return self.decode(z_mean, x, training=training).mean()

    def train_step(self, data):
        gradients, terms = self.compute_gradients(_features(data))
        self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))
        return self._update_metrics(terms)

    def compute_gradients(self, x):
        """(gradients, terms): the gradients, one per ``trainable_weights`` in that order, of
        the training loss, the mean over the global batch of ``compute_terms(x)["loss"]``,
        scaled as the optimizer's loss scaling asks."""
        dreg = self.gradient_estimator == "dreg"
        with tf.GradientTape(persistent=dreg) as tape:
            terms = self.compute_terms(x, training=True)
            # Gradients are summed over replicas, so each replica divides its sum by the
            # global batch size: the result is the mean over the global batch, also when
            # the replicas' shares differ.
            loss = self.optimizer.scale_loss(ops.sum(terms["loss"]) / _global_batch_size(x))
        if dreg:
            return self._dreg_gradients(tape, loss, terms), terms
        return tape.gradient(loss, self.trainable_weights), terms

    def _encoder_side_weights(self):
        """φ: the weights of q_φ(z|x); θ is every other trainable weight (the decoder's and
        the likelihood's)."""
        return (self.encoder_network.trainable_weights + self.z_mean_head.trainable_weights
                + self.z_log_var_head.trainable_weights)

    def _dreg_gradients(self, tape, loss, terms):
        """Gradients of ``loss`` (−IWAE bound) for θ, then φ by the DReG estimator.

        With log q(z_k|x) stopped in q's parameters, φ reaches the loss only through
        z_k = μ + σ ⊙ ε_k. One backward pass through the decoder gives θ's gradient and
        g_k = ∂loss/∂z_k = −w̃_k ∂log w_k/∂z_k (w̃ = softmax_k log w). The bound's gradient
        Σ_k w̃_k (∂log w_k/∂z_k · ∂z_k/∂φ − β ∂log q/∂φ) has its score term replaced by its
        reparameterized form (Tucker et al., 2019, eq. 5), which gives
        Σ_k w̃_k (1 − β + β w̃_k) ∂log w_k/∂z_k · ∂z_k/∂φ; for the loss, its negative: g_k
        scaled by 1 − β + β w̃_k (w̃_k for β = 1), then taken back through the encoder alone.
        """
        encoder_side = self._encoder_side_weights()
        encoder_ids = {id(v) for v in encoder_side}
        decoder_side = [v for v in self.trainable_weights if id(v) not in encoder_ids]
        *decoder_gradients, z_gradient = tape.gradient(loss, decoder_side + [terms["z"]])
        w_normalized = ops.stop_gradient(ops.softmax(terms["log_w"], axis=0))
        beta = ops.stop_gradient(terms["beta"])
        z_gradient = z_gradient * ops.expand_dims(1.0 - beta + beta * w_normalized, -1)
        encoder_gradients = tape.gradient(terms["z"], encoder_side, output_gradients=z_gradient)
        # In trainable_weights' order, which the optimizer's slots (and checkpoints) follow.
        by_id = {id(v): g for v, g in zip(decoder_side + encoder_side,
                                          decoder_gradients + encoder_gradients)}
        return [by_id[id(v)] for v in self.trainable_weights]

    def test_step(self, data):
        return self._update_metrics(self.compute_terms(_features(data), training=False))

    def _update_metrics(self, terms):
        # Per-example values: each metric is the mean over examples, not over batches.
        for tracker in self.metrics:
            tracker.update_state(terms[tracker.name])
        results = {tracker.name: tracker.result() for tracker in self.metrics}
        if _spans_workers(tf.distribute.get_strategy()):
            # Keras reduces multi-worker logs with reduce(MEAN, axis=0), which fails on
            # scalars (tensorflow/tensorflow#72388): give it one value per replica.
            results = {name: ops.expand_dims(value, 0) for name, value in results.items()}
        return results

    # ------------------------------------------------------------------ public API
    def reconstruct(self, x):
        """E[x | z = μ_φ(x)] for each x."""
        return self(x)

    def sample(self, num_samples, seed=None):
        """E[x | z] for z_1..z_n ~ p(z): [n, *data_shape]. For an autoregressive decoder,
        E[x_d | x_<d, z] along a draw x ~ p_θ(x|z)."""
        z_shape, noise_shape = (num_samples, self.latent_dim), (num_samples,) + self.data_shape
        noise = None
        if seed is None:
            z = keras.random.normal(z_shape, seed=self.sampling.seed_generator)
            if self.autoregressive:
                noise = keras.random.uniform(noise_shape, seed=self.sampling.seed_generator)
        else:  # stateless, so that sample() also runs inside a tf.function
            z = tf.random.stateless_normal(z_shape, seed=[seed, 0])
            if self.autoregressive:
                noise = tf.random.stateless_uniform(noise_shape, seed=[seed, 1])
        return self.decode(z, noise=noise).mean()

    def elbo(self, x, num_samples=1, seed=None):
        """Per-example ELBO E_q[log p_θ(x|z)] − KL(q_φ(z|x) ‖ p(z)) in nats ([batch]), the
        expectation estimated with ``num_samples`` draws, the KL by the model's estimator."""
        return self.score(x, num_samples, seed=seed)["elbo"]

    def score(self, x, num_samples, seed=None, epsilon=None):
        """Per example, from the same K draws z_k ~ q_φ(z|x): ``elbo`` (as in ``elbo``) and
        ``log_px`` = log (1/K) Σ_k p_θ(x|z_k) p(z_k) / q_φ(z_k|x), the importance-weighted
        estimate of log p_θ(x) (a lower bound in expectation, tight as K → ∞)."""
        log_px_z, log_pz, log_qz, kl_analytic = self.log_weights(
            x, num_samples, seed=seed, epsilon=epsilon)
        return {
            "elbo": ops.mean(log_px_z, axis=0) - self._kl_estimate(log_pz, log_qz, kl_analytic),
            "log_px": log_mean_exp(log_px_z + log_pz - log_qz),
        }

    # ------------------------------------------------------------------ checks, config
    def _check_shape(self, x):
        shape = tuple(x.shape)
        if len(shape) != len(self.data_shape) + 1 or any(
            got is not None and got != want for got, want in zip(shape[1:], self.data_shape)
        ):
            raise ValueError(
                f"{self.name} expects inputs of shape (batch,) + {self.data_shape}; "
                f"got shape {shape}."
            )

    def _checked(self, x):
        x = ops.cast(ops.convert_to_tensor(x), "float32")
        self._check_shape(x)
        if self.check_inputs:
            with tf.control_dependencies(self.likelihood.check_support(x)):
                x = tf.identity(x)
        return x

    def get_config(self):
        return {
            **super().get_config(),
            "data_shape": list(self.data_shape),
            "latent_dim": self.latent_dim,
            "architecture": self.architecture,
            "hidden_units": list(self.hidden_units),
            "filters": list(self.filters),
            "activation": self.activation,
            "dropout": self.dropout,
            "likelihood": self.likelihood_name,
            "sigma": self.sigma,
            "learn_sigma": self.learn_sigma,
            "beta": self.beta,
            "kl_warmup_steps": self.kl_warmup_steps,
            "kl": self.kl,
            "objective": self.objective,
            "num_samples": self.num_samples,
            "gradient_estimator": self.gradient_estimator,
            "seed": self.seed,
            "check_inputs": self.check_inputs,
        }


def log_mean_exp(values, axis=0):
    """log (1/K) Σ_k exp(values_k) along ``axis``, computed stably with logsumexp."""
    count = ops.cast(ops.shape(values)[axis], values.dtype)
    return ops.logsumexp(values, axis=axis) - ops.log(count)


def _spans_workers(strategy):
    """True when the strategy has replicas in other processes (multi-worker training)."""
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.num_replicas_in_sync > len(strategy.extended.worker_devices))


def _global_batch_size(x):
    local = ops.cast(ops.shape(x)[0], "float32")
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return local
    return context.all_reduce(tf.distribute.ReduceOp.SUM, local)


def _features(data):
    """x from a Keras batch: ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``."""
    return data[0] if isinstance(data, (tuple, list)) else data
