"""The variational autoencoder p(z) p_θ(x|z) with posterior q_φ(z|x), composed of the pieces
it receives: encoder and decoder networks, a likelihood, a prior and a posterior.

Per example, in nats:
    reconstruction_loss = −E_q[log p_θ(x|z)]            (Monte Carlo, z ~ q_φ(z|x))
    kl_loss             = KL(q_φ(z|x) ‖ p(z))             (closed form, or Monte Carlo)
    elbo                = −reconstruction_loss − kl_loss  (≤ log p_θ(x))
    loss                = reconstruction_loss + β kl_loss             (objective "elbo")
                        = −log (1/K) Σ_k p(x|z_k) p(z_k)^β / q(z_k|x)^β (objective "iwae")
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_vae import compat, registry
from keras_vae.likelihoods import BernoulliLikelihood
from keras_vae.model_config import VAEConfig
from keras_vae.sampling import SeedStream
from keras_vae.settings import validate

CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(VAEConfig))


@keras.saving.register_keras_serializable(package="keras_vae")
class VAE(keras.Model):
    """A VAE trained with ``model.fit`` on batches of x (labels, if present, are ignored).

    Args:
        encoder: any Keras layer or model x → features; the posterior's heads (μ_φ(x),
            log σ²_φ(x) for the diagonal Gaussian) sit on top of it.
        decoder: any Keras layer or model z [n, d] → the likelihood's parameters
            [n, *data_shape] (Bernoulli logits, the Gaussian mean); or an autoregressive
            decoder (``autoregressive = True``, ``call(z, x)``, ``draw(z, noise)``; see
            ``keras_vae.networks``). ``keras_vae.networks.build`` makes the named families.
        data_shape: shape of one example, e.g. ``(28, 28, 1)``; default: the encoder's
            input shape, when it has one.
        likelihood, prior, posterior: a registered name (``keras_vae.registry``) or the
            piece itself (a ``likelihoods.Likelihood``, e.g. ``GaussianLikelihood(sigma=0.1,
            learn_sigma="shared")``; a prior such as ``priors.StandardNormal()``; a posterior
            such as ``posteriors.DiagonalGaussian(seed=0)``).
        config: a ``VAEConfig``; ``**settings`` override its fields (latent_dim, beta,
            kl_warmup_steps, kl, objective, num_samples, gradient_estimator, seed,
            check_inputs, each documented there). Other keyword arguments go to
            ``keras.Model`` (``name``, ``dtype``: the dtype policy of the posterior's heads,
            e.g. ``"mixed_bfloat16"``; sampling, distributions and losses are float32).
    """

    def __init__(
        self,
        encoder,
        decoder,
        data_shape=None,
        likelihood="bernoulli",
        prior="standard_normal",
        posterior="diagonal_gaussian",
        config=None,
        **kwargs,
    ):
        settings = {key: kwargs.pop(key) for key in CONFIG_FIELDS if key in kwargs}
        super().__init__(**kwargs)
        self.config = validate(dataclasses.replace(config or VAEConfig(), **settings))
        self.data_shape = _data_shape(encoder, data_shape)
        self.latent_dim = self.config.latent_dim
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = _piece("likelihood", likelihood)
        self.prior = _piece("prior", prior)
        self.posterior = _piece(
            "posterior", posterior, seed=self.config.seed, dtype=self.dtype_policy
        )
        self.prior_samples = SeedStream(self.config.seed, name="prior_samples")
        if self.autoregressive and not isinstance(self.likelihood, BernoulliLikelihood):
            raise ValueError(
                f"an autoregressive decoder draws binary data: it needs likelihood="
                f"'bernoulli', got {self.likelihood.name!r}."
            )
        if self.config.kl == "analytic" and not (
            self.prior.analytic_kl and self.posterior.analytic_kl
        ):
            raise ValueError(
                f"KL({self.posterior.name} ‖ {self.prior.name}) has no closed form: use kl='mc'."
            )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")
        self.elbo_tracker = keras.metrics.Mean(name="elbo")
        # Built now, so that save/export work even if fit never calls self(x).
        self.build((None,) + self.data_shape)

    def build(self, input_shape):
        # Pieces restored by keras.saving.load_model arrive built.
        if not self.posterior.built:
            self.posterior.build(
                self.encoder.compute_output_shape(tuple(input_shape)), self.latent_dim
            )
        if not self.prior.built:
            self.prior.build((self.latent_dim,))
        if not self.likelihood.built:
            self.likelihood.build(self.data_shape)
        if self.autoregressive:
            if not self.decoder.built:
                self.decoder.build()
        else:
            try:
                shape = self.decoder.compute_output_shape((None, self.latent_dim))
            except ValueError as error:
                raise ValueError(
                    f"the decoder does not take z of shape (batch, {self.latent_dim}): {error}"
                ) from None
            if tuple(shape[1:]) != self.data_shape:
                raise ValueError(
                    f"the decoder maps z of shape (batch, {self.latent_dim}) to shape "
                    f"{tuple(shape)}; the likelihood needs (batch,) + {self.data_shape}."
                )
        self.built = True

    @property
    def autoregressive(self):
        """Whether the decoder's parameter of x_d depends on x_<d as well as z."""
        return getattr(self.decoder, "autoregressive", False)

    def compile(self, *args, jit_compile="auto", **kwargs):
        """``keras.Model.compile``; ``jit_compile="auto"`` means no XLA while ``check_inputs``
        is on, since XLA would silently drop the input checks."""
        if jit_compile == "auto" and self.config.check_inputs:
            jit_compile = False
        super().compile(*args, jit_compile=jit_compile, **kwargs)

    def compile_from_config(self, config):
        compat.compile_from_config(self, config)

    def check_data(self, x):
        """Raises ValueError naming the problem unless the array x (e.g. a whole training
        set) has the model's data shape and every value is finite and in the likelihood's
        support."""
        x = np.asarray(x, "float32")
        self._check_shape(x)
        self.likelihood.check_array(x)

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            self.reconstruction_loss_tracker,
            self.kl_loss_tracker,
            self.elbo_tracker,
        ]

    # ------------------------------------------------------------------ distributions
    def encode_params(self, x, training=False):
        """The posterior's parameters for x: a dict of float32 tensors [batch, …]
        (``z_mean`` μ_φ(x) and ``z_log_var`` log σ²_φ(x) for the diagonal Gaussian)."""
        self._check_shape(x)
        return self.posterior(self.encoder(x, training=training))

    def encode(self, x, training=False):
        """q_φ(z|x) as a TFP distribution with batch shape [batch]."""
        return self.posterior.distribution(self.encode_params(self.validated(x), training))

    def decode(self, z, x=None, noise=None, training=False):
        """p_θ(x|z) for z of shape [..., d]; batch shape [...], event shape ``data_shape``.

        An autoregressive decoder's factor of x_d is p(x_d | x_<d, z), so it needs the
        x_<d it is conditioned on. With ``x`` ([batch, *data_shape], z [..., batch, d]) they
        are x's own: ``log_prob(x)`` is then log p_θ(x|z) exactly (and only at that x).
        Without ``x`` (z [n, d]) they are drawn one element at a time (``decoder.draw``),
        x_d = 1[u_d < p_d] for uniform ``noise`` u ([n, *data_shape]): a sample
        x ~ p_θ(x|z), or with ``noise=None`` the greedy path x_d = 1[p_d > ½]; the
        distribution returned has the factors along that path (D + 1 decoder passes in
        all). A factorized decoder ignores ``x`` and ``noise``.
        """
        z = ops.convert_to_tensor(z, "float32")
        if self.config.check_inputs:
            z = _asserted_finite(z, "keras_vae: z contains NaN or inf")
        return self._decode(z, x, noise, training)

    def _decode(self, z, x=None, noise=None, training=False):
        """``decode`` of the model's own z (drawn or encoded, never NaN unless x overflows)."""
        if self.autoregressive:
            if x is None:
                x = self.decoder.draw(z, noise)
            return self.likelihood.distribution(
                self.decoder(z, ops.convert_to_tensor(x, "float32"), training=training)
            )
        leading = ops.shape(z)[:-1]
        # The networks take [n, d]; K samples per example arrive as [K, batch, d].
        params = self.decoder(ops.reshape(z, (-1, self.latent_dim)), training=training)
        params = ops.reshape(params, tuple(leading) + self.data_shape)
        return self.likelihood.distribution(params)

    # ------------------------------------------------------------------ objective
    def current_beta(self):
        """β, scaled by min(1, step / kl_warmup_steps) during KL warm-up."""
        beta, warmup = self.config.beta, self.config.kl_warmup_steps
        if warmup == 0 or self.optimizer is None:
            return ops.convert_to_tensor(beta, "float32")
        step = ops.cast(self.optimizer.iterations + 1, "float32")
        return beta * ops.minimum(1.0, step / warmup)

    def log_weights(
        self, x, num_samples=1, training=False, seed=None, epsilon=None, densities=True
    ):
        """For z_k ~ q_φ(z|x), k = 1..K: the [K, batch] tensors log p_θ(x|z_k), log p(z_k),
        log q_φ(z_k|x), and the closed-form KL(q_φ(z|x) ‖ p(z)) of shape [batch] (None where
        the prior and posterior have none).

        ``epsilon`` ([K, batch or 1, d]) fixes the posterior's base noise of the z_k. With
        ``densities=False`` log p(z_k) and log q_φ(z_k|x) are not computed (None).
        """
        return self._sample_log_weights(x, num_samples, training, seed, epsilon, densities)[1:]

    def _sample_log_weights(
        self,
        x,
        num_samples,
        training,
        seed=None,
        epsilon=None,
        densities=True,
        stop_posterior=False,
    ):
        """``log_weights`` preceded by the samples z [K, batch, d]; with ``stop_posterior``,
        log q(z_k|x) is differentiable in z_k only, not in q's parameters."""
        x = self.validated(x)
        params = self.encode_params(x, training=training)
        posterior = self.posterior.distribution(params)
        prior = self.prior.distribution()
        z = self.posterior.sample(params, num_samples, seed=seed, epsilon=epsilon)
        log_px_z = self._decode(z, x, training=training).log_prob(x)
        kl = None
        if self.prior.analytic_kl and self.posterior.analytic_kl:
            kl = tf.convert_to_tensor(posterior.kl_divergence(prior))
        if not densities:
            return z, log_px_z, None, None, kl
        if stop_posterior:
            posterior = self.posterior.distribution(
                {key: ops.stop_gradient(value) for key, value in params.items()}
            )
        return z, log_px_z, prior.log_prob(z), posterior.log_prob(z), kl

    def _kl_estimate(self, log_pz, log_qz, kl_analytic):
        if self.config.kl == "analytic":
            return kl_analytic
        return ops.mean(log_qz - log_pz, axis=0)

    def compute_terms(self, x, training=False, beta=None, seed=None):
        """Per-example (shape [batch]) ``loss``, ``reconstruction_loss``, ``kl_loss``, ``elbo``,
        with the model's K samples, KL estimator, objective and β (default: current β).

        With ``gradient_estimator="dreg"`` and ``training``, log q_φ(z|x) in ``loss`` is
        stopped in q's parameters: its value is the IWAE loss, but its gradient is DReG's
        only as ``compute_gradients`` takes it."""
        config = self.config
        beta = self.current_beta() if beta is None else beta
        dreg = training and config.gradient_estimator == "dreg"
        z, log_px_z, log_pz, log_qz, kl_analytic = self._sample_log_weights(
            x,
            config.num_samples,
            training,
            seed,
            densities=config.kl == "mc" or config.objective == "iwae",
            stop_posterior=dreg,
        )
        reconstruction_loss = -ops.mean(log_px_z, axis=0)
        kl_loss = self._kl_estimate(log_pz, log_qz, kl_analytic)
        if config.objective == "elbo":
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
        """The reconstruction E[x | z = the posterior's mean] (probabilities for
        Bernoulli); for an autoregressive decoder, each element's E[x_d | x_<d, z]."""
        x = self.validated(x)
        params = self.encode_params(x, training=training)
        return self._decode(self.posterior.mean(params), x, training=training).mean()

    def train_step(self, data):
        gradients, terms = self.compute_gradients(_features(data))
        self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))
        return self._update_metrics(terms)

    def compute_gradients(self, x):
        """(gradients, terms): the gradients, one per ``trainable_weights`` in that order, of
        the training loss, the mean over the global batch of ``compute_terms(x)["loss"]``,
        scaled as the optimizer's loss scaling asks."""
        dreg = self.config.gradient_estimator == "dreg"
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
        """φ: the weights of q_φ(z|x) (encoder and posterior); θ is every other trainable
        weight (the decoder's, the likelihood's, a learned prior's)."""
        return self.encoder.trainable_weights + self.posterior.trainable_weights

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
        by_id = {
            id(v): g
            for v, g in zip(decoder_side + encoder_side, decoder_gradients + encoder_gradients)
        }
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
        """E[x | z = the posterior's mean] for each x."""
        return self(x)

    def sample_prior(self, num_samples, seed=None):
        """z_1..z_n ~ p(z), [n, d]; ``seed`` (an int, or a stateless seed pair) makes the
        draw stateless, else the model's seed stream is used."""
        if seed is None:
            seed = self.prior_samples.next()
        elif isinstance(seed, int):
            seed = (seed, 0)
        return self.prior.distribution().sample(num_samples, seed=seed)

    def sample(self, num_samples, seed=None):
        """E[x | z] for z_1..z_n ~ p(z): [n, *data_shape]. For an autoregressive decoder,
        E[x_d | x_<d, z] along a draw x ~ p_θ(x|z), whose uniform noise comes from the same
        seed."""
        z = self.sample_prior(num_samples, seed)
        noise = None
        if self.autoregressive:
            if seed is None:
                noise_seed = self.prior_samples.next()
            elif isinstance(seed, int):
                noise_seed = (seed, 1)
            else:  # a stateless seed pair: the noise's is derived from it
                noise_seed = tf.random.experimental.stateless_fold_in(seed, 1)
            noise = tf.random.stateless_uniform((num_samples,) + self.data_shape, seed=noise_seed)
        return self._decode(z, noise=noise).mean()

    def elbo(self, x, num_samples=1, seed=None):
        """Per-example ELBO E_q[log p_θ(x|z)] − KL(q_φ(z|x) ‖ p(z)) in nats ([batch]), the
        expectation estimated with ``num_samples`` draws, the KL by the model's estimator."""
        return self.score(x, num_samples, seed=seed)["elbo"]

    def score(self, x, num_samples, seed=None, epsilon=None):
        """Per example, from the same K draws z_k ~ q_φ(z|x): ``elbo`` (as in ``elbo``) and
        ``log_px`` = log (1/K) Σ_k p_θ(x|z_k) p(z_k) / q_φ(z_k|x), the importance-weighted
        estimate of log p_θ(x) (a lower bound in expectation, tight as K → ∞)."""
        log_px_z, log_pz, log_qz, kl_analytic = self.log_weights(
            x, num_samples, seed=seed, epsilon=epsilon
        )
        scores = {
            "elbo": ops.mean(log_px_z, axis=0) - self._kl_estimate(log_pz, log_qz, kl_analytic),
            "log_px": log_mean_exp(log_px_z + log_pz - log_qz),
        }
        if not self.config.check_inputs:
            return scores
        # Finite inputs of huge magnitude overflow the networks' float32 arithmetic.
        message = "keras_vae: the score is not finite: x is too large for the model's float32"
        return {key: _asserted_finite(value, message) for key, value in scores.items()}

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

    def validated(self, x):
        """x as a float32 tensor, its shape checked and, with ``check_inputs``, asserted
        (in graph or eager mode) to be finite and in the likelihood's support."""
        x = ops.cast(ops.convert_to_tensor(x), "float32")
        self._check_shape(x)
        if self.config.check_inputs:
            with tf.control_dependencies(self.likelihood.check_support(x)):
                x = tf.identity(x)
        return x

    def get_config(self):
        pieces = {
            name: keras.saving.serialize_keras_object(getattr(self, name))
            for name in ("encoder", "decoder", "likelihood", "prior", "posterior")
        }
        return {
            **super().get_config(),
            **pieces,
            "data_shape": list(self.data_shape),
            "config": dataclasses.asdict(self.config),
        }

    @classmethod
    def from_config(cls, config):
        registry.load_all()
        config = dict(config)
        for name in ("encoder", "decoder", "likelihood", "prior", "posterior"):
            config[name] = keras.saving.deserialize_keras_object(config[name])
        config["config"] = VAEConfig(**config["config"])
        return cls(**config)


def _asserted_finite(values, message):
    """``values``, asserted (in graph or eager mode) to hold no NaN or inf."""
    # values·0 is NaN exactly where values are NaN or ±inf; its sum cannot overflow.
    finite = tf.math.is_finite(tf.reduce_sum(values * ops.cast(0, values.dtype)))
    with tf.control_dependencies([tf.debugging.Assert(finite, [message])]):
        return tf.identity(values)


def _piece(kind, value, **kwargs):
    """A likelihood, prior or posterior: ``value`` itself, or the registered class of that
    name made with ``kwargs``."""
    if isinstance(value, str):
        return registry.load(kind, value)(**kwargs)
    return value


def _data_shape(encoder, data_shape):
    """``data_shape``, or the encoder's input shape without the batch axis."""
    if data_shape is not None:
        return tuple(int(n) for n in data_shape)
    inputs = getattr(encoder, "inputs", None)
    try:
        return tuple(int(n) for n in inputs[0].shape[1:])
    except (TypeError, IndexError, AttributeError):
        raise ValueError("data_shape is needed: the encoder has no Input to read it from") from None


def log_mean_exp(values, axis=0):
    """log (1/K) Σ_k exp(values_k) along ``axis``, computed stably with logsumexp."""
    count = ops.cast(ops.shape(values)[axis], values.dtype)
    return ops.logsumexp(values, axis=axis) - ops.log(count)


def _spans_workers(strategy):
    """True when the strategy has replicas in other processes (multi-worker training)."""
    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and strategy.num_replicas_in_sync > len(strategy.extended.worker_devices)


def _global_batch_size(x):
    local = ops.cast(ops.shape(x)[0], "float32")
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return local
    return context.all_reduce(tf.distribute.ReduceOp.SUM, local)


def _features(data):
    """x from a Keras batch: ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``."""
    return data[0] if isinstance(data, (tuple, list)) else data
