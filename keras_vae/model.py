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

# optimizers registers FusedAdam, which the compile state of a run's saved model names.
from keras_vae import compat, optimizers, registry  # noqa: F401
from keras_vae.likelihoods import BernoulliLikelihood
from keras_vae.model_config import VAEConfig
from keras_vae.sampling import SeedStream
from keras_vae.settings import validate

CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(VAEConfig))


@keras.saving.register_keras_serializable(package="keras_vae")
class VAE(keras.Model):
    """A VAE trained with ``model.fit`` on batches of x, or of (x, y) for a conditional
    model (an unconditional one ignores labels).

    Args:
        encoder: any Keras layer or model x → features; the posterior's heads (μ_φ(x),
            log σ²_φ(x) for the diagonal Gaussian) sit on top of it (on the features and
            c(y), side by side, for a conditional model).
        decoder: any Keras layer or model z [n, d] (a conditional model's: [z, c(y)],
            [n, d + C]) → the likelihood's parameters
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
            kl_warmup_steps, kl, free_bits, objective, num_samples, gradient_estimator,
            num_classes, condition_dim, seed, check_inputs, each documented there). Other keyword arguments go to
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
        self.likelihood = _piece("likelihood", likelihood, self.config.seed)
        self.prior = _piece("prior", prior, self.config.seed)
        self.posterior = _piece("posterior", posterior, self.config.seed, dtype=self.dtype_policy)
        self.prior_samples = SeedStream(self.config.seed, name="prior_samples")
        if self.autoregressive and not isinstance(self.likelihood, BernoulliLikelihood):
            raise ValueError(
                f"an autoregressive decoder draws binary data: it needs likelihood="
                f"'bernoulli', got {self.likelihood.name!r}."
            )
        prior, posterior = type(self.prior).__name__, type(self.posterior).__name__
        if self.config.gradient_estimator == "dreg" and not (
            self.posterior.params_complete and not self.prior.reads_posterior
        ):
            raise ValueError(
                f"gradient_estimator 'dreg' takes φ's gradient through z alone: it needs a "
                f"posterior that is a function of its parameters and a prior that does not "
                f"read q_φ; got {posterior} and {prior}."
            )
        if self.prior.reads_posterior and self.conditional:
            raise ValueError(
                f"{prior} is built from the posterior q_φ(z|x), which a conditional model "
                f"does not have without labels: use another prior."
            )
        if self.prior.reads_condition and not self.conditional:
            raise ValueError(
                f"{prior} is p(z|y): it needs a conditional model (num_classes or condition_dim)."
            )
        if self.prior.reads_posterior and not self.prior.can_read(self.posterior):
            raise ValueError(
                f"{prior} is built from the posterior q_φ(z|x) and needs "
                f"{self.prior.posterior_requirement}, not {posterior}: use another prior or "
                f"posterior."
            )
        if self.config.kl == "analytic" and not self.has_analytic_kl:
            raise ValueError(
                f"KL({type(self.posterior).__name__} ‖ {type(self.prior).__name__}) has no "
                f"closed form: use kl='auto' or 'mc'."
            )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")
        self.elbo_tracker = keras.metrics.Mean(name="elbo")
        # Built now, so that save/export work even if fit never calls self(x); a
        # conditional model's input is (x, y), as Keras's default signature must call it.
        x_shape = (None,) + self.data_shape
        if self.conditional:
            y_shape = (None,) if self.config.num_classes else (None, self.config.condition_dim)
            self.build((x_shape, y_shape))
        else:
            self.build(x_shape)

    def build(self, input_shape):
        x_shape = tuple(input_shape[0] if self.conditional else input_shape)
        # Pieces restored by keras.saving.load_model arrive built.
        if not self.posterior.built:
            features = self.encoder.compute_output_shape(x_shape)
            # A conditional posterior reads the features and c(y), side by side.
            features = (*features[:-1], features[-1] + self.condition_dim)
            self.posterior.build(features, self.latent_dim)
        if not self.prior.built:
            self.prior.build((self.latent_dim,), self.data_shape, self.condition_dim)
        if not self.likelihood.built:
            self.likelihood.build(self.data_shape)
        layers = getattr(self.posterior, "sizes", None), getattr(self.prior, "sizes", None)
        if None not in layers and layers[0] != layers[1]:
            raise ValueError(
                f"the posterior's stochastic layers {list(layers[0])} and the prior's "
                f"{list(layers[1])} differ: give both the same latent_layers"
            )
        if getattr(self.posterior, "reads_prior", False):
            self.posterior.attach(self.prior)  # a posterior that shares the prior's networks
        # Each stochastic layer's term of the KL, where q and p share their layers.
        self.layer_kl_trackers = [
            keras.metrics.Mean(name=f"kl_{layer + 1}") for layer in range(len(self.latent_layers))
        ]
        if self.autoregressive:
            if not self.decoder.built:
                self.decoder.build()
        else:
            width = self.latent_dim + self.condition_dim
            inputs = "[z, c(y)]" if self.conditional else "z"
            try:
                shape = self.decoder.compute_output_shape((None, width))
            except ValueError as error:
                raise ValueError(
                    f"the decoder does not take {inputs} of shape (batch, {width}): {error}"
                ) from None
            if tuple(shape[1:]) != self.data_shape:
                raise ValueError(
                    f"the decoder maps {inputs} of shape (batch, {width}) to shape "
                    f"{tuple(shape)}; the likelihood needs (batch,) + {self.data_shape}."
                )
        self.built = True

    @property
    def has_analytic_kl(self):
        """Whether KL(q_φ(z|x) ‖ p(z)) has a closed form for this prior and posterior."""
        return self.prior.analytic_kl and self.posterior.analytic_kl

    @property
    def analytic_kl(self):
        """Whether the KL term is the closed form (else the Monte Carlo estimate)."""
        return self.config.kl != "mc" and self.has_analytic_kl

    @property
    def conditional(self):
        """Whether q, p and the networks read labels y."""
        return self.condition_dim > 0

    @property
    def condition_dim(self):
        """C, the size of c(y): the one-hot of a class, or the conditioning vector itself."""
        return self.config.num_classes or self.config.condition_dim

    def condition(self, y, batch_size=None):
        """c(y) as float32 [batch, C]: the one-hot of integer classes y [batch] in
        [0, num_classes), or real vectors y [batch, condition_dim] as they are; None for an
        unconditional model (which ignores y). Shapes are checked; with ``check_inputs``,
        values are asserted to be whole classes in range, or finite."""
        if not self.conditional:
            return None
        if y is None:
            raise ValueError(f"{self.name} is conditional: it needs labels y")
        y = ops.convert_to_tensor(y)
        classes = self.config.num_classes
        want = (None,) if classes else (None, self.config.condition_dim)
        shape = tuple(y.shape)
        if len(shape) != len(want) or (len(want) == 2 and shape[1] not in (None, want[1])):
            kind = f"integer classes in [0, {classes})" if classes else "real vectors"
            raise ValueError(
                f"{self.name} expects labels y of shape (batch,) + {want[1:]} ({kind}); "
                f"got shape {shape}."
            )
        if batch_size is not None:
            y = tf.ensure_shape(y, (None,) + tuple(want[1:]))
            same = tf.debugging.assert_equal(
                tf.shape(y)[0],
                tf.cast(batch_size, tf.int32),
                message="keras_vae: x and y have different batch sizes",
            )
            with tf.control_dependencies([same]):
                y = tf.identity(y)
        if not classes:
            c = ops.cast(y, "float32")
            if self.config.check_inputs:
                c = _asserted_finite(c, "keras_vae: labels y contain NaN or inf")
            return c
        if self.config.check_inputs:
            y_float = ops.cast(y, "float32")
            whole = tf.reduce_all(
                (y_float >= 0) & (y_float < classes) & (y_float == tf.round(y_float))
            )
            message = f"keras_vae: labels y must be whole classes in [0, {classes})"
            with tf.control_dependencies([tf.debugging.Assert(whole, [message])]):
                y = tf.identity(y)
        return ops.one_hot(ops.cast(y, "int32"), classes, dtype="float32")

    def check_labels(self, y):
        """Raises ValueError naming the problem unless the array y (e.g. a data set's labels)
        is what this conditional model reads: whole classes in [0, num_classes), or finite
        vectors of size condition_dim."""
        y = np.asarray(y)
        classes = self.config.num_classes
        if classes:
            if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.number)):
                raise ValueError(f"labels must be one class per example; got shape {y.shape}")
            bad = ~((y >= 0) & (y < classes) & (y == np.round(y)))
            if bad.any():
                first = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"labels must be whole classes in [0, {classes}); label {first} is {y[first]}"
                )
        else:
            if y.ndim != 2 or y.shape[1] != self.config.condition_dim:
                raise ValueError(
                    f"labels must be vectors of size {self.config.condition_dim}; got shape "
                    f"{y.shape}"
                )
            if not np.isfinite(y.astype("float64")).all():
                raise ValueError("labels contain NaN or inf")

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
    def latent_layers(self):
        """(d_1, …, d_L), the sizes of the stochastic layers z_1..z_L that the posterior
        and the prior share, where both are hierarchical with L > 1; else ()."""
        sizes = getattr(self.posterior, "sizes", None)
        if sizes is None or len(sizes) < 2 or getattr(self.prior, "sizes", None) != sizes:
            return ()
        return tuple(sizes)

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            self.reconstruction_loss_tracker,
            self.kl_loss_tracker,
            self.elbo_tracker,
            *self.layer_kl_trackers,
        ]

    # ------------------------------------------------------------------ distributions
    def encode_params(self, x, training=False, y=None, c=None):
        """The posterior's parameters for x (and labels y, or their c(y)): a dict of float32
        tensors [batch, …] (``z_mean`` μ_φ(x) and ``z_log_var`` log σ²_φ(x) for the
        diagonal Gaussian)."""
        self._check_shape(x)
        features = self.encoder(x, training=training)
        if c is None:
            c = self.condition(y, ops.shape(x)[0])
        if c is not None:
            features = ops.concatenate([features, ops.cast(c, features.dtype)], axis=-1)
        return self.posterior(features)

    def encode(self, x, training=False, y=None):
        """q_φ(z|x) (q_φ(z|x, y) for a conditional model) as a TFP distribution with batch
        shape [batch]."""
        return self.posterior.distribution(self.encode_params(self.validated(x), training, y=y))

    def decode(self, z, x=None, noise=None, training=False, y=None):
        """p_θ(x|z) for z of shape [..., d]; batch shape [...], event shape ``data_shape``.

        An autoregressive decoder's factor of x_d is p(x_d | x_<d, z), so it needs the
        x_<d it is conditioned on. With ``x`` ([batch, *data_shape], z [..., batch, d]) they
        are x's own: ``log_prob(x)`` is then log p_θ(x|z) exactly (and only at that x).
        Without ``x`` (z [n, d]) they are drawn one element at a time (``decoder.draw``),
        x_d = 1[u_d < p_d] for uniform ``noise`` u ([n, *data_shape]): a sample
        x ~ p_θ(x|z), or with ``noise=None`` the greedy path x_d = 1[p_d > ½]; the
        distribution returned has the factors along that path (D + 1 decoder passes in
        all). A factorized decoder ignores ``x`` and ``noise``. A conditional model's
        decoder reads labels y ([batch]: p_θ(x|z, y)) beside z.
        """
        z = ops.convert_to_tensor(z, "float32")
        if self.config.check_inputs:
            z = _asserted_finite(z, "keras_vae: z contains NaN or inf")
        return self._decode(z, x, noise, training, self.condition(y, ops.shape(z)[-2]))

    def _decode(self, z, x=None, noise=None, training=False, c=None):
        """``decode`` of the model's own z (drawn or encoded, never NaN unless x overflows),
        conditioned on c(y) [batch, C] where the model is conditional."""
        return self.likelihood.distribution(self._decode_params(z, x, noise, training, c))

    def _decode_params(self, z, x=None, noise=None, training=False, c=None):
        """The decoder's output, the likelihood's params, for ``_decode``'s arguments."""
        if c is not None:
            c = ops.broadcast_to(c, (*ops.shape(z)[:-1], self.condition_dim))
            z = ops.concatenate([z, c], axis=-1)
        if self.autoregressive:
            if x is None:
                x = self.decoder.draw(z, noise)
            return self.decoder(z, ops.convert_to_tensor(x, "float32"), training=training)
        leading = ops.shape(z)[:-1]
        # The networks take [n, d + C]; K samples per example arrive as [K, batch, d + C].
        params = self.decoder(ops.reshape(z, (-1, ops.shape(z)[-1])), training=training)
        return ops.reshape(params, tuple(leading) + self.data_shape)

    # ------------------------------------------------------------------ objective
    def current_beta(self):
        """β, scaled by min(1, step / kl_warmup_steps) during KL warm-up."""
        beta, warmup = self.config.beta, self.config.kl_warmup_steps
        if warmup == 0 or self.optimizer is None:
            return ops.convert_to_tensor(beta, "float32")
        step = ops.cast(self.optimizer.iterations + 1, "float32")
        return beta * ops.minimum(1.0, step / warmup)

    def log_weights(
        self,
        x,
        num_samples=1,
        training=False,
        seed=None,
        epsilon=None,
        densities=True,
        y=None,
        by_layer=False,
        log_likelihood=None,
    ):
        """For z_k ~ q_φ(z|x), k = 1..K: the [K, batch] tensors log p_θ(x|z_k), log p(z_k),
        log q_φ(z_k|x), and the closed-form KL(q_φ(z|x) ‖ p(z)) of shape [batch] (None where
        the prior and posterior have none). A conditional model conditions each on labels y.

        ``epsilon`` ([K, batch or 1, d]) fixes the posterior's base noise of the z_k. With
        ``densities=False`` log p(z_k) and log q_φ(z_k|x) are not computed (None). With
        ``by_layer``, a fifth tensor: log q(z_l,k|·) − log p(z_l,k|·) for each stochastic
        layer, [L, K, batch], which sums over l to log q_φ(z_k|x) − log p(z_k) (None for a
        model without ``latent_layers``). ``log_likelihood(params, x)`` computes
        log p_θ(x|z_k) from the decoder's output in place of ``likelihood.log_prob`` (the
        evaluation passes ``likelihood.fused_log_prob`` where there is one; ``compute_terms``
        uses it too).
        """
        draws = self._draws(
            x, y, num_samples, training, seed, epsilon, densities, log_likelihood=log_likelihood
        )
        terms = draws["log_px_z"], draws["log_pz"], draws["log_qz"], draws["kl"]
        return (*terms, draws["layer_log_ratio"]) if by_layer else terms

    def _draws(
        self,
        x,
        y,
        num_samples,
        training,
        seed=None,
        epsilon=None,
        densities=True,
        stop_posterior=False,
        log_likelihood=None,
    ):
        """``log_weights``'s terms by name, with the posterior's ``params`` and the samples
        ``z`` [K, batch, d]; with ``stop_posterior``, log q(z_k|x) is differentiable in z_k
        only, not in q's parameters. For a model with ``latent_layers``, ``layer_kl`` [L,
        batch] holds each layer's term of the Monte Carlo KL, the mean over the draws of
        log q(z_l|·) − log p(z_l|·)."""
        x = self.validated(x)
        c = self.condition(y, ops.shape(x)[0])
        params = self.encode_params(x, training=training, c=c)
        draws = {"params": params, "c": c, "kl": None, "log_pz": None, "log_qz": None}
        draws["layer_kl"] = draws["layer_log_ratio"] = None
        prior = self.prior.distribution(self._posterior_at, c)
        if self.has_analytic_kl:
            draws["kl"] = tf.convert_to_tensor(
                self.posterior.distribution(params).kl_divergence(prior)
            )
        if densities and self.latent_layers:
            z, log_q = self.posterior.sample_and_layer_log_probs(
                params, num_samples, seed=seed, epsilon=epsilon
            )
            log_p = prior.layer_log_probs(z)
            draws["log_qz"], draws["log_pz"] = ops.sum(log_q, axis=0), ops.sum(log_p, axis=0)
            draws["layer_log_ratio"] = log_q - log_p  # [L, K, batch]
            draws["layer_kl"] = ops.mean(draws["layer_log_ratio"], axis=1)  # [L, batch]
        elif densities and not stop_posterior:
            z, draws["log_qz"] = self.posterior.sample_and_log_prob(
                params, num_samples, seed=seed, epsilon=epsilon
            )
        else:
            z = self.posterior.sample(params, num_samples, seed=seed, epsilon=epsilon)
        if densities and stop_posterior:
            stopped = {key: ops.stop_gradient(value) for key, value in params.items()}
            draws["log_qz"] = self.posterior.distribution(stopped).log_prob(z)
        if densities and draws["log_pz"] is None:
            draws["log_pz"] = prior.log_prob(z)
        draws["z"] = z
        params_x = self._decode_params(z, x, training=training, c=c)
        draws["log_px_z"] = (log_likelihood or self.likelihood.log_prob)(params_x, x)
        return draws

    def _posterior_at(self, x):
        """q_φ(z|x) for inputs x [n, *data_shape]: what a prior built from the posterior
        (the VampPrior) reads."""
        return self.posterior.distribution(self.posterior(self.encoder(x)))

    def _kl_term(self, draws):
        """KL(q_φ(z|x) ‖ p(z)) per example: the closed form if used, else the mean over
        the draws of log q_φ(z_k|x) − log p(z_k)."""
        if self.analytic_kl:
            return draws["kl"]
        return ops.mean(draws["log_qz"] - draws["log_pz"], axis=0)

    def _free_bits_kl(self, draws, kl):
        """The KL term of the training loss under free bits (Kingma et al., 2016) with
        λ = ``free_bits``, per example, whose mean over the batch is Σ_j max(λ, K̄_j): K̄_j
        the batch mean of KL(q(z_j|x) ‖ p(z_j)) per latent dimension j, where q and p
        factorize over j (the closed form, whatever the ``kl`` estimator); else, for a
        top-down hierarchy, Σ_l max(λ·d_l, K̄_l) over its stochastic layers (each layer's
        Monte Carlo KL term); else one group, the whole z, with max(λ·d, K̄). A group below
        its floor adds the constant floor and no gradient. Under a ``tf.distribute``
        strategy K̄ is each replica's batch mean."""
        floor = self.config.free_bits
        q = self.posterior.marginals(draws["params"])
        p = self.prior.marginals(draws["c"])
        if q is not None and p is not None:
            kl_groups = tf.convert_to_tensor(q.kl_divergence(p))  # [batch, d]
        elif self.latent_layers and getattr(self.posterior, "top_down", False):
            # Top-down, each layer's term estimates a KL: one group each, floored at λ·d_l.
            kl_groups = ops.transpose(draws["layer_kl"])
            floor = floor * ops.convert_to_tensor(self.latent_layers, "float32")
        else:
            kl_groups, floor = kl[:, None], floor * self.latent_dim
        used = ops.stop_gradient(ops.mean(kl_groups, axis=0)) >= floor
        return ops.sum(ops.where(used, kl_groups, floor), axis=-1)

    def compute_terms(self, x, training=False, beta=None, seed=None, y=None):
        """Per-example (shape [batch]) ``loss``, ``reconstruction_loss``, ``kl_loss``, ``elbo``
        and, for L latent layers, ``kl_1`` … ``kl_L`` (summing to ``kl_loss``), with the
        model's K samples, KL estimator, objective, free bits and β (default: current β);
        log p_θ(x|z) by the likelihood's ``fused_log_prob`` where it has one.
        ``kl_loss`` and ``elbo`` are the true ones, free bits or not.

        With ``gradient_estimator="dreg"`` and ``training``, log q_φ(z|x) in ``loss`` is
        stopped in q's parameters: its value is the IWAE loss, but its gradient is DReG's
        only as ``compute_gradients`` takes it; the terms then also hold ``z``, the log
        weights ``log_w`` and ``beta``."""
        config = self.config
        beta = self.current_beta() if beta is None else beta
        dreg = training and config.gradient_estimator == "dreg"
        draws = self._draws(
            x,
            y,
            config.num_samples,
            training,
            seed,
            densities=not self.analytic_kl or config.objective == "iwae",
            stop_posterior=dreg,
            log_likelihood=self.likelihood.fused_log_prob,
        )
        log_px_z = draws["log_px_z"]
        reconstruction_loss = -ops.mean(log_px_z, axis=0)
        kl_loss = self._kl_term(draws)
        if config.objective == "elbo":
            kl_objective = kl_loss if config.free_bits == 0 else self._free_bits_kl(draws, kl_loss)
            loss = reconstruction_loss + beta * kl_objective
        else:
            log_w = log_px_z + beta * (draws["log_pz"] - draws["log_qz"])
            loss = -log_mean_exp(log_w)
        terms = {
            "loss": loss,
            "reconstruction_loss": reconstruction_loss,
            "kl_loss": kl_loss,
            "elbo": -reconstruction_loss - kl_loss,
        }
        for layer, layer_kl in (
            enumerate(ops.unstack(draws["layer_kl"])) if self.latent_layers else ()
        ):
            terms[f"kl_{layer + 1}"] = layer_kl
        if dreg:  # what train_step needs to reweight the gradient that reaches z
            terms.update(z=draws["z"], log_w=log_w, beta=beta)
        return terms

    # ------------------------------------------------------------------ Keras hooks
    def call(self, inputs, training=False):
        """The reconstruction E[x | z = the posterior's mean] (probabilities for
        Bernoulli) of inputs x, or (x, y) for a conditional model; for an autoregressive
        decoder, each element's E[x_d | x_<d, z]."""
        x, y = _unpacked(inputs)
        x = self.validated(x)
        c = self.condition(y, ops.shape(x)[0])
        params = self.encode_params(x, training=training, c=c)
        return self._decode(self.posterior.mean(params), x, training=training, c=c).mean()

    def train_step(self, data):
        gradients, terms = self.compute_gradients(*_unpacked(data))
        self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))
        return self._update_metrics(terms)

    def compute_gradients(self, x, y=None):
        """(gradients, terms): the gradients, one per ``trainable_weights`` in that order, of
        the training loss, the mean over the global batch of ``compute_terms(x, y=y)
        ["loss"]``, scaled as the optimizer's loss scaling asks."""
        dreg = self.config.gradient_estimator == "dreg"
        with tf.GradientTape(persistent=dreg) as tape:
            terms = self.compute_terms(x, training=True, y=y)
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
        x, y = _unpacked(data)
        return self._update_metrics(self.compute_terms(x, training=False, y=y))

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
    def reconstruct(self, x, y=None):
        """E[x | z = the posterior's mean] for each x (and its label y, if conditional)."""
        return self(x if y is None else (x, y))

    def sample_prior(self, num_samples, seed=None, labels=None):
        """z_1..z_n ~ p(z), [n, d], or z_i ~ p(z|y_i) for a prior that reads the ``labels``;
        ``seed`` (an int, or a stateless seed pair) makes the draw stateless, else the
        model's seed stream is used."""
        c = self.condition(labels, num_samples) if self.prior.reads_condition else None
        return self._sample_prior(num_samples, seed, c)

    def _sample_prior(self, num_samples, seed, c):
        if seed is None:
            seed = self.prior_samples.next()
        elif isinstance(seed, int):
            seed = (seed, 0)
        prior = self.prior.distribution(self._posterior_at, c)
        # p(z|y) is one distribution per label; p(z) gives all n draws itself.
        return prior.sample(() if self.prior.reads_condition else num_samples, seed=seed)

    def sample(self, num_samples, seed=None, labels=None):
        """E[x | z] for z_1..z_n ~ p(z): [n, *data_shape]; a conditional model's
        E[x | z, y] for the ``labels`` y ([n] classes or [n, C] vectors), z ~ p(z|y) where
        the prior reads them. For an autoregressive decoder, E[x_d | x_<d, z] along a draw
        x ~ p_θ(x|z), whose uniform noise comes from the same seed."""
        c = self.condition(labels, num_samples)
        z = self._sample_prior(num_samples, seed, c)
        noise = None
        if self.autoregressive:
            if seed is None:
                noise_seed = self.prior_samples.next()
            elif isinstance(seed, int):
                noise_seed = (seed, 1)
            else:  # a stateless seed pair: the noise's is derived from it
                noise_seed = tf.random.experimental.stateless_fold_in(seed, 1)
            noise = tf.random.stateless_uniform((num_samples,) + self.data_shape, seed=noise_seed)
        return self._decode(z, noise=noise, c=c).mean()

    def elbo(self, x, num_samples=1, seed=None, y=None):
        """Per-example ELBO E_q[log p_θ(x|z)] − KL(q_φ(z|x) ‖ p(z)) in nats ([batch]), the
        expectation estimated with ``num_samples`` draws, the KL by the model's estimator
        (of log p(x|y) for a conditional model and labels y)."""
        return self.score(x, num_samples, seed=seed, y=y)["elbo"]

    def score(self, x, num_samples, seed=None, epsilon=None, y=None):
        """Per example, from the same K draws z_k ~ q_φ(z|x): ``elbo`` (as in ``elbo``) and
        ``log_px`` = log (1/K) Σ_k p_θ(x|z_k) p(z_k) / q_φ(z_k|x), the importance-weighted
        estimate of log p_θ(x) (a lower bound in expectation, tight as K → ∞); for a
        conditional model, of log p_θ(x|y), each term conditioned on the labels y."""
        draws = self._draws(x, y, num_samples, training=False, seed=seed, epsilon=epsilon)
        scores = {
            "elbo": ops.mean(draws["log_px_z"], axis=0) - self._kl_term(draws),
            "log_px": log_mean_exp(draws["log_px_z"] + draws["log_pz"] - draws["log_qz"]),
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


def _piece(kind, value, seed, **kwargs):
    """A likelihood, prior or posterior: ``value`` itself, or the registered class of that
    name made with its defaults, ``kwargs`` and, if it takes one, ``seed``."""
    if isinstance(value, str):
        return registry.make(kind, value, {"seed": seed}, **kwargs)
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


def _unpacked(data):
    """(x, y) from a Keras batch or call input: ``x``, ``(x,)``, ``(x, y)`` or ``(x, y,
    sample_weight)``; y is None where absent."""
    if not isinstance(data, (tuple, list)):
        return data, None
    return data[0], (data[1] if len(data) > 1 else None)
