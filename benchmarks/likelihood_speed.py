"""The Bernoulli likelihood's cost: keras_vae's against TFP's ``Bernoulli``.

    python benchmarks/likelihood_speed.py [--repeats 5]

Times, alternating, forward and backward of Σ log p(x|z) over logits of MNIST row 2's
shape (K = 50 samples × batch 100 × 784 pixels), by TFP's ``Bernoulli``, keras_vae's
``LogitBernoulli`` and the ``bernoulli_log_prob`` that training uses (its value XLA-fused,
its gradient by TensorFlow's kernels; also with XLA's own gradient of the fused value);
then row 2's whole training step (784-200-200-50 tanh MLPs, IWAE K = 50, batch 100,
FusedAdam) with each of the first three in the likelihood, and with the DReG gradient
estimator that row 2 trains with; then row 2's DReG step in float32 and mixed_bfloat16,
each with and without XLA. Prints the medians in ms and the speed-up over each race's
first contender.
"""

import argparse
import statistics
import time

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from machine import describe

from keras_vae import VAE, FusedAdam, likelihoods, networks

K, BATCH, PIXELS = 50, 100, 784


def time_calls(fn, calls):
    fn()  # tracing
    start = time.perf_counter()
    for _ in range(calls):
        out = fn()
    tf.nest.map_structure(np.asarray, out)  # the results, read back
    return (time.perf_counter() - start) / calls * 1e3


def summed_log_prob(distribution, logits, x):
    """Σ log p(x|z) over pixels, [K, batch], by ``distribution`` (None: keras_vae's
    ``bernoulli_log_prob``; "xla": its XLA-fused value, differentiated by XLA)."""
    if distribution is None:
        return likelihoods.bernoulli_log_prob(logits, x)
    if distribution == "xla":
        return likelihoods.fused_bernoulli_log_prob(logits, x)
    base = distribution(logits=logits, dtype=tf.float32)
    return tfp.distributions.Independent(base, 1).log_prob(x)


def log_prob_step(x, distribution, _estimator):  # no gradient estimator enters log p
    logits = tf.random.stateless_normal((K, BATCH, PIXELS), (0, 1)) * 3.0

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(logits)
            total = tf.reduce_sum(summed_log_prob(distribution, logits, x))
        # The value is returned too: training reports it, so its forward pass must run.
        return total, tape.gradient(total, logits)

    return step


def train_step(x, distribution, estimator, dtype="float32", jit_compile=False):
    # The row-2 model, its likelihood's distribution swapped for ``distribution``.
    encoder, decoder = networks.build(
        "mlp", (PIXELS,), 50, dtype=dtype, seed=0, hidden_units=(200, 200), activation="tanh"
    )
    model = VAE(
        encoder,
        decoder,
        latent_dim=50,
        objective="iwae",
        num_samples=K,
        gradient_estimator=estimator,
        seed=0,
        dtype=dtype,
    )
    if distribution is not None:  # training's fused_log_prob replaced by the distribution's
        model.likelihood.fused_log_prob = None
        model.likelihood.distribution = lambda params: model.likelihood._independent(
            distribution(logits=tf.cast(params, tf.float32), dtype=tf.float32)
        )
    model.compile(optimizer=FusedAdam(1e-3))
    return tf.function(lambda: model.train_step(x), jit_compile=jit_compile)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    print(describe(), flush=True)
    x = tf.cast(tf.random.stateless_uniform((BATCH, PIXELS), (2, 3)) < 0.13, tf.float32)
    ours = None  # bernoulli_log_prob, what keras_vae trains with
    contenders = {
        "tfp Bernoulli": (tfp.distributions.Bernoulli, "reparam"),
        "keras_vae LogitBernoulli": (likelihoods.LogitBernoulli, "reparam"),
        "keras_vae bernoulli_log_prob": (ours, "reparam"),
    }
    races = [
        (
            "log p(x|z), forward + backward, [50, 100, 784]",
            log_prob_step,
            {**contenders, "fused, XLA's own gradient": ("xla", "reparam")},
        ),
        (
            "row-2 IWAE K=50 train step, batch 100",
            train_step,
            {**contenders, "keras_vae bernoulli_log_prob, DReG": (ours, "dreg")},
        ),
        (
            "row-2 DReG train step by precision",
            train_step,
            {
                "float32": (ours, "dreg"),
                "float32 + XLA": (ours, "dreg", "float32", True),
                "mixed_bfloat16": (ours, "dreg", "mixed_bfloat16"),
                "mixed_bfloat16 + XLA": (ours, "dreg", "mixed_bfloat16", True),
            },
        ),
    ]
    for title, make, race in races:
        steps = {name: make(x, *contender) for name, contender in race.items()}
        times = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                times[name].append(time_calls(step, args.calls))
        medians = {name: statistics.median(t) for name, t in times.items()}
        print(f"\n{title}: median of {args.repeats} × {args.calls} calls")
        reference = next(iter(medians.values()))
        for name, ms in medians.items():
            print(f"  {name:<32}{ms:8.2f} ms {reference / ms:6.2f}x")


if __name__ == "__main__":
    main()
