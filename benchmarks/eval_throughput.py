"""Importance-weighted evaluation against the machine's float32 matmul peak.

    python benchmarks/eval_throughput.py [--examples 200] [--k 5000] [--rows 1 3] [--repeats 3]

For MNIST row 1 (784-200-200-50 tanh MLPs, configs/mnist_vae.yaml) and row 3 (an MLP
encoder and a MADE + PixelCNN decoder, configs/mnist_pixelcnn_made.yaml), each built in
float32 and untrained (the cost does not depend on the weights), times
``keras_vae.evaluate.importance_weighted`` (what ``keras-vae evaluate`` runs) at K draws per
example on the first test images of ``--mnist`` (binarized once, as the results' test set;
the time of the first 100, which includes tracing, is taken off; the median of
``--repeats`` timings), and prints examples/s, the FLOPs per example counted from the
model's graph by TensorFlow's profiler (the encoder once, then K draws, each the
posterior's and prior's densities and the decoder's log p(x|z)), the achieved GFLOP/s and
their fraction of the measured matmul peak.
"""

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from machine import describe, matmul_peak

from keras_vae.config import RunConfig
from keras_vae.data import binarize_once
from keras_vae.evaluate import importance_weighted
from keras_vae.fitting import build_model

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"
ROWS = {1: "configs/mnist_vae.yaml", 3: "configs/mnist_pixelcnn_made.yaml"}


def graph_flops(model, x, num_samples):
    """FLOPs of ``model.log_weights`` for one example and ``num_samples`` draws, as
    TensorFlow's profiler counts them in the traced graph."""
    epsilon = tf.zeros((num_samples, 1, model.latent_dim))
    function = tf.function(lambda x: model.log_weights(x, epsilon=epsilon)[:3])
    graph = function.get_concrete_function(tf.TensorSpec((1, *model.data_shape))).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return tf.compat.v1.profiler.profile(graph, options=options).total_float_ops


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--rows", type=int, nargs="+", default=sorted(ROWS), choices=sorted(ROWS))
    parser.add_argument("--mnist", type=Path, default=MNIST)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.examples <= 100:
        parser.error("--examples must be > 100: the first batch of 100 absorbs the tracing")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    print(describe())
    peak = matmul_peak()
    print(f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    with np.load(args.mnist) as data:
        x = binarize_once(data["x_test"][: args.examples, ..., None].astype("float32") / 255)
    print(f"{'row':<5}{'K':>6}{'examples/s':>12}{'GFLOP/example':>15}{'GFLOP/s':>10}{'of peak':>9}")
    for row in args.rows:
        config = RunConfig.load(ROOT / ROWS[row]).model
        model = build_model(config, x.shape[1:])
        one, two = graph_flops(model, x[:1], 1), graph_flops(model, x[:1], 2)
        flops = one + (args.k - 1) * (two - one)  # the encoder once, then K draws
        timings = []
        for _ in range(args.repeats):
            # Each call traces its own step: the time of the first batch of 100, tracing
            # included, is taken off that of all the examples.
            seconds = []
            for n in (100, len(x)):
                start = time.perf_counter()
                importance_weighted(model, x[:n], args.k)
                seconds.append(time.perf_counter() - start)
            timings.append((len(x) - 100) / (seconds[1] - seconds[0]))
        per_second = statistics.median(timings)
        rate = per_second * flops
        print(
            f"{row:<5}{args.k:>6}{per_second:>12.2f}{flops / 1e9:>15.3f}"
            f"{rate / 1e9:>10.1f}{rate / peak:>9.0%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
