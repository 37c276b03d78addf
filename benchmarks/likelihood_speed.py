"""The Bernoulli likelihood's cost: keras_vae's ``LogitBernoulli`` against TFP's ``Bernoulli``.

    python benchmarks/likelihood_speed.py [--repeats 5]

Times, alternating, forward and backward of Σ log p(x|z) over logits of MNIST row 2's
shape (K = 50 samples × batch 100 × 784 pixels), then row 2's whole training step
(784-200-200-50 tanh MLPs, IWAE K = 50, batch 100, FusedAdam) with each distribution in
the likelihood, and with the DReG gradient estimator that row 2 trains with. Prints the
medians in ms and the speed-up over TFP's Bernoulli.
"""

import argparse
import statistics
import time

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from keras_vae import VAE, FusedAdam, likelihoods

K, BATCH, PIXELS = 50, 100, 784


def time_calls(fn, calls):
    fn()  # tracing
    start = time.perf_counter()
    for _ in range(calls):
        out = fn()
    tf.nest.map_structure(np.asarray, out)  # the results, read back
    return (time.perf_counter() - start) / calls * 1e3


def log_prob_step(x, distribution, _estimator):  # no gradient estimator enters log p
    logits = tf.random.stateless_normal((K, BATCH, PIXELS), (0, 1)) * 3.0

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(logits)
            total = tf.reduce_sum(tfp.distributions.Independent(
                distribution(logits=logits, dtype=tf.float32), 1).log_prob(x))
        return tape.gradient(total, logits)

    return step


def train_step(x, distribution, estimator):
    # The row-2 model, its likelihood's distribution swapped for ``distribution``.
    model = VAE((PIXELS,), latent_dim=50, hidden_units=(200, 200), activation="tanh",
                objective="iwae", num_samples=K, gradient_estimator=estimator, seed=0)
    model.likelihood.distribution = lambda params: model.likelihood._independent(
        distribution(logits=tf.cast(params, tf.float32), dtype=tf.float32))
    model.compile(optimizer=FusedAdam(1e-3))
    step = tf.function(lambda: model.train_step(x))
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    x = tf.cast(tf.random.stateless_uniform((BATCH, PIXELS), (2, 3)) < 0.13, tf.float32)
    ours = likelihoods.LogitBernoulli
    contenders = {"tfp Bernoulli": (tfp.distributions.Bernoulli, "reparam"),
                  "keras_vae LogitBernoulli": (ours, "reparam")}
    races = [("log p(x|z), forward + backward, [50, 100, 784]", log_prob_step, contenders),
             ("row-2 IWAE K=50 train step, batch 100", train_step,
              {**contenders, "keras_vae LogitBernoulli, DReG": (ours, "dreg")})]
    for title, make, race in races:
        steps = {name: make(x, *contender) for name, contender in race.items()}
        times = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                times[name].append(time_calls(step, args.calls))
        medians = {name: statistics.median(t) for name, t in times.items()}
        print(f"\n{title}: median of {args.repeats} × {args.calls} calls")
        reference = medians["tfp Bernoulli"]
        for name, ms in medians.items():
            print(f"  {name:<28}{ms:8.2f} ms {reference / ms:6.2f}x")


if __name__ == "__main__":
    main()
