"""Importance-weighted evaluation: log p(x), the ELBO and the variational gap, in nats.

For each example, with z_k ~ q_φ(z|x) and w_k = p_θ(x|z_k) p(z_k) / q_φ(z_k|x):
    log p̂_K(x) = log (1/K) Σ_k w_k        (E[log p̂_K] ≤ log p(x), → log p(x) as K → ∞)
    ELBO(x)    = (1/K) Σ_k log p_θ(x|z_k) − KL(q_φ(z|x) ‖ p(z))   (KL in closed form, or
                 (1/K) Σ_k log q_φ(z_k|x) − log p(z_k) where it has none)
    gap(x)     = log p̂_K(x) − ELBO(x)     (estimates KL(q_φ(z|x) ‖ p_θ(z|x)))
The standard error of log p̂_K(x) is a delete-a-batch jackknife over B batches of the K draws
(draw k in batch k mod B), computed on log p̂ itself.
Draws are taken in chunks over K with a running logsumexp, so memory is bounded by
``batch_size × chunk_size`` decodes whatever K is. Noise is stateless, a function of the
seed, the batch's index and shape and the draw's index: the same call gives the same numbers,
however chunked.
"""

import math
import time

import numpy as np
import tensorflow as tf
from scipy.special import logsumexp

from keras_vae import data as datasets
from keras_vae.latent import latent_report
from keras_vae.likelihoods import BernoulliLikelihood

# B, the batches of draws of the jackknife standard error of log p̂_K (B = K when K < B).
SE_BATCHES = 20


def k_ladder(num_samples):
    """1, 10, 100, … up to K, and K itself."""
    ladder = [10**i for i in range(int(math.log10(num_samples)) + 1) if 10**i < num_samples]
    return ladder + [num_samples]


def chunk_bounds(num_samples, chunk_size, stops):
    """The ends of the successive chunks of draws 0..K: each multiple of ``chunk_size`` and
    each of ``stops`` (sorted), generated one at a time so that memory does not grow with K."""
    done, stops = 0, iter(stops)
    stop = next(stops, num_samples)
    while done < num_samples:
        while stop <= done:
            stop = next(stops, num_samples)
        done = min((done // chunk_size + 1) * chunk_size, stop, num_samples)
        yield done


class _Accumulator:
    """Running per-example sums over draws, in log space where needed. Draw k belongs to
    batch k mod B (B = min(``SE_BATCHES``, K)), whose log Σ w_k is kept for the jackknife
    standard error of log p̂_K."""

    def __init__(self, n, num_samples):
        self.batches = min(SE_BATCHES, num_samples)
        self.lse_batch = np.full((n, self.batches), -np.inf)  # log Σ_{k in batch b} w_k
        self.sum_ll = np.zeros(n)  # Σ log p(x|z_k)
        self.sum_ll2 = np.zeros(n)  # Σ (log p(x|z_k))²
        self.sum_log_ratio = np.zeros(n)  # Σ log q(z_k|x) − log p(z_k)
        self.count = 0

    def add(self, log_w, log_px_z):
        """Adds draws ``count``, ``count`` + 1, … ([draws, n] arrays)."""
        log_w, log_px_z = np.float64(log_w), np.float64(log_px_z)
        b, offset = self.batches, self.count % self.batches
        # Rows of B draws (w = 0 in the padding) put draw k in column k mod B: one
        # logsumexp for the chunk rather than one per batch.
        rows = -(-(offset + len(log_w)) // b)
        padded = np.full((rows * b, log_w.shape[1]), -np.inf)
        padded[offset : offset + len(log_w)] = log_w
        # Non-finite draws give NaN sums that importance_weighted reports by example.
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            by_batch = logsumexp(padded.reshape(rows, b, -1), axis=0)
            self.lse_batch = np.logaddexp(self.lse_batch, by_batch.T)
            self.sum_ll += log_px_z.sum(0)
            self.sum_ll2 += (log_px_z**2).sum(0)
            self.sum_log_ratio += (log_px_z - log_w).sum(0)
        self.count += len(log_w)

    def log_px(self):
        """log p̂_k = log (1/k) Σ_k w_k over the k draws added so far."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return logsumexp(self.lse_batch, axis=1) - math.log(self.count)

    def log_px_se(self):
        """The delete-a-batch jackknife standard error of log p̂_K:
        √((B − 1)/B · Σ_b (L₋b − L̄)²), L₋b = log p̂ of the draws outside batch b, L̄ the mean
        of the L₋b; NaN for K = 1, which has no spread to measure."""
        b = self.batches
        if b < 2:
            return np.full(len(self.lse_batch), np.nan)
        others = np.where(np.eye(b, dtype=bool), -np.inf, 0.0)
        # Draws 0 … count − 1 fill the batches in turn: the first count mod B hold one more.
        batch_sizes = self.count // b + (np.arange(b) < self.count % b)
        with np.errstate(invalid="ignore"):
            left_out = logsumexp(self.lse_batch[:, None, :] + others, axis=2) - np.log(
                self.count - batch_sizes
            )
            spread = np.sum((left_out - left_out.mean(1, keepdims=True)) ** 2, axis=1)
        return np.sqrt((b - 1) / b * spread)


def draw_noise(seed, batch_index, first, count, batch_size, latent_dim):
    """ε [count, batch_size, latent_dim] ~ N(0, I), draws first … first + count − 1 of batch
    b: draw k is the run of P numbers of the Philox stream keyed by (seed, b) that starts at
    counter k·P/4 (P = batch_size · latent_dim rounded up to a multiple of 4, as Philox
    gives 4 numbers per counter), so each draw's noise is the same however the draws are
    chunked, and a chunk takes one random op."""
    size = batch_size * latent_dim
    padded = (size + 3) // 4 * 4
    key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(
        seed=tf.stack([tf.constant(seed, tf.int64), batch_index])
    )
    offset = tf.cast(first * tf.cast(padded // 4, tf.int64), tf.uint64)
    count = tf.cast(count, tf.int32)
    flat = tf.raw_ops.StatelessRandomNormalV2(
        shape=tf.stack([count, padded]),
        key=key,
        counter=counter + tf.stack([offset, tf.constant(0, tf.uint64)]),
        alg=tf.random.Algorithm.PHILOX.value,
        dtype=tf.float32,
    )
    return tf.reshape(flat[:, :size], tf.stack([count, batch_size, latent_dim]))


def importance_weighted(model, x, num_samples, batch_size=100, chunk_size=500, seed=0, y=None):
    """Per-example arrays: ``elbo``, ``elbo_se``, ``kl``, ``log_px``, ``log_px_se`` (K draws),
    ``kl_per_layer`` [L, N] (each stochastic layer's Monte Carlo term of the KL, the mean over
    the draws of log q(z_l|·) − log p(z_l|·); L = 0 without ``latent_layers``), and
    ``log_px_by_k`` {k: log p̂_k(x)} for k in ``k_ladder(K)`` (from the same draws); for a
    conditional model, of log p(x|y) given the labels y."""
    for name, value in (
        ("num_samples", num_samples),
        ("batch_size", batch_size),
        ("chunk_size", chunk_size),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    x = np.asarray(x, "float32")
    if not len(x):
        raise ValueError("nothing to evaluate: x has no examples")
    model.check_data(x)
    if model.conditional:
        if y is None:
            raise ValueError("the model is conditional: evaluating it needs the labels y")
        model.check_labels(y)
    ladder = k_ladder(num_samples)
    # XLA fuses the likelihood's element-wise steps, on the widest tensor of the step,
    # while the networks keep TensorFlow's own matmul kernels.
    log_likelihood = model.likelihood.fused_log_prob

    @tf.function(reduce_retracing=True)
    def draws(x_batch, y_batch, first, count, batch_index):
        epsilon = draw_noise(
            seed, batch_index, first, count, tf.shape(x_batch)[0], model.latent_dim
        )
        log_px_z, log_pz, log_qz, kl, by_layer = model.log_weights(
            x_batch, epsilon=epsilon, y=y_batch, by_layer=True, log_likelihood=log_likelihood
        )
        if by_layer is None:
            return log_px_z + log_pz - log_qz, log_px_z, kl, tf.zeros([0, tf.shape(x_batch)[0]])
        return log_px_z + log_pz - log_qz, log_px_z, kl, tf.reduce_sum(by_layer, axis=1)

    out = {key: [] for key in ("elbo", "elbo_se", "kl", "log_px", "log_px_se", "kl_per_layer")}
    by_k = {k: [] for k in ladder}
    for b, start in enumerate(range(0, len(x), batch_size)):
        x_batch = tf.constant(x[start : start + batch_size])
        y_batch = None if not model.conditional else tf.constant(y[start : start + batch_size])
        acc = _Accumulator(len(x_batch), num_samples)
        layer_sums = np.zeros((len(model.latent_layers), len(x_batch)))
        done = 0
        for bound in chunk_bounds(num_samples, chunk_size, ladder):
            log_w, log_px_z, kl, chunk_layer_sums = draws(
                x_batch,
                y_batch,
                tf.constant(done, tf.int64),
                tf.constant(bound - done, tf.int64),
                tf.constant(b, tf.int64),
            )
            acc.add(log_w.numpy(), log_px_z.numpy())
            layer_sums += np.float64(chunk_layer_sums)
            done = bound
            if bound in by_k:
                by_k[bound].append(acc.log_px())
        log_px = acc.log_px()
        bad = np.flatnonzero(~(np.isfinite(log_px) & np.isfinite(acc.sum_ll)))
        if len(bad):
            first = start + bad[0]
            raise ValueError(
                f"the scores of {len(bad)} examples are not finite (first: example {first}, "
                f"max |x| {np.abs(x[first]).max():g}): x is too large for the model's float32"
            )
        k = acc.count
        mean_ll = acc.sum_ll / k
        var_ll = np.maximum(acc.sum_ll2 / k - mean_ll**2, 0.0) * k / max(k - 1, 1)
        # The closed-form KL where the prior and posterior have one, else its Monte Carlo
        # estimate from the same draws.
        kl = acc.sum_log_ratio / k if kl is None else np.float64(kl.numpy())
        out["elbo"].append(mean_ll - kl)
        out["elbo_se"].append(np.sqrt(var_ll / k))
        out["kl"].append(kl)
        out["kl_per_layer"].append(layer_sums / k)
        out["log_px"].append(log_px)
        out["log_px_se"].append(acc.log_px_se())
    result = {key: np.concatenate(values, axis=-1) for key, values in out.items()}
    result["log_px_by_k"] = {k: np.concatenate(values) for k, values in by_k.items()}
    return result


def mean_and_se(values):
    values = np.asarray(values, np.float64)
    return {
        "mean": float(values.mean()),
        "se": float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0,
    }


def evaluate(
    model,
    x,
    num_samples=1000,
    batch_size=100,
    chunk_size=500,
    seed=0,
    y=None,
    x_train=None,
    y_train=None,
):
    """The evaluation report (nats per example; bits/dim = −log p / (D ln 2) for the
    Bernoulli likelihood, whose p is a probability; a density's would depend on the data's
    scale: None) and the per-example arrays.

    The report's ``latent`` section measures the latent code on x (``latent.latent_report``);
    with the test labels ``y`` and a labelled training set ``x_train``, ``y_train`` it
    includes the accuracy of a linear probe of the encoder means. A conditional model is
    scored on log p(x|y) with the labels ``y`` (and ``y_train``) it reads."""
    model.check_data(x)
    # The latent measures (and their checks of the labels) before the long scoring.
    measures = latent_report(model, x, batch_size, seed, y, x_train, y_train)
    started = time.perf_counter()
    scores = importance_weighted(model, x, num_samples, batch_size, chunk_size, seed, y)
    seconds = time.perf_counter() - started
    dims = int(np.prod(model.data_shape))
    log_px = mean_and_se(scores["log_px"])
    report = {
        "num_examples": len(x),
        "test_set_sha256": datasets.fingerprint(x),
        "k": num_samples,
        "elbo": mean_and_se(scores["elbo"]),
        "kl": mean_and_se(scores["kl"]),
        "kl_per_layer": [mean_and_se(kl) for kl in scores["kl_per_layer"]] or None,
        "log_px": log_px,
        "gap": mean_and_se(scores["log_px"] - scores["elbo"]),
        "log_px_by_k": {str(k): mean_and_se(v) for k, v in scores["log_px_by_k"].items()},
        "bits_per_dim": (
            -log_px["mean"] / (dims * math.log(2))
            if isinstance(model.likelihood, BernoulliLikelihood)
            else None
        ),
        "seconds": seconds,
        "latent": measures,
    }
    return report, scores
