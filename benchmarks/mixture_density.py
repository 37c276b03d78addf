"""The mixture priors' log p(z): keras_vae's ``DiagonalGaussianMixture`` against TFP's
``MixtureSameFamily`` of ``MultivariateNormalDiag`` components.

    python benchmarks/mixture_density.py [--repeats 5]

Times log p(z) (and its gradient) of the VampPrior of MNIST row 6 (K = 500 components,
d = 40) at the z of one evaluation chunk (100 draws × 100 examples; TFP's [draws, batch, K,
d] intermediates need over 20 GB at evaluate's default of 500 draws) and of one training
step (batch 100), alternating the two; prints the medians in ms, the speed-up and the
largest difference between the two log p(z).
"""

import argparse
import statistics
import time

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from machine import describe

from keras_vae.priors import DiagonalGaussianMixture

tfd = tfp.distributions
COMPONENTS, D = 500, 40


def tfp_mixture(logits, loc, scale):
    return tfd.MixtureSameFamily(
        tfd.Categorical(logits=logits), tfd.MultivariateNormalDiag(loc=loc, scale_diag=scale)
    )


def step(build, z, params, gradient):
    @tf.function
    def run():
        if not gradient:
            return build(*params).log_prob(z)
        with tf.GradientTape() as tape:
            tape.watch(params)
            total = tf.reduce_sum(build(*params).log_prob(z))
        return tape.gradient(total, params)

    return run


def median_ms(fn, repeats, calls):
    fn()  # tracing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn()
        tf.nest.map_structure(np.asarray, out)
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(describe())
    rng = np.random.default_rng(0)
    params = [
        tf.constant(np.zeros(COMPONENTS), tf.float32),
        tf.constant(rng.normal(size=(COMPONENTS, D)), tf.float32),
        tf.constant(rng.uniform(0.05, 1.0, size=(COMPONENTS, D)), tf.float32),
    ]
    print(f"{'case':<44}{'TFP ms':>10}{'ours ms':>10}{'speed-up':>10}{'max |Δ log p|':>15}")
    for title, shape, gradient, calls in (
        ("evaluation chunk, z [100, 100, 40]", (100, 100, D), False, 2),
        ("training step, z [100, 40], with gradient", (100, D), True, 50),
    ):
        z = tf.constant(rng.normal(size=shape), tf.float32)
        theirs = step(tfp_mixture, z, params, gradient)
        ours = step(DiagonalGaussianMixture, z, params, gradient)
        times = {"tfp": [], "ours": []}
        for _ in range(args.repeats):  # alternating, so that both see the same machine load
            times["tfp"].append(median_ms(theirs, 1, calls))
            times["ours"].append(median_ms(ours, 1, calls))
        tfp_ms, our_ms = (statistics.median(times[k]) for k in ("tfp", "ours"))
        difference = np.abs(
            tfp_mixture(*params).log_prob(z).numpy()
            - DiagonalGaussianMixture(*params).log_prob(z).numpy()
        ).max()
        print(
            f"{title:<44}{tfp_ms:>10.1f}{our_ms:>10.1f}{tfp_ms / our_ms:>9.1f}x{difference:>15.2e}"
        )


if __name__ == "__main__":
    main()
