"""How far TensorFlow's bfloat16 gradients of a convolution and a matmul fall from float32's
on this machine: the same inputs and kernels, loss = Σ outputs.

    python benchmarks/bf16_gradients.py [--batch 64]

Prints, for each op, the relative error ‖g_bf16 − g_f32‖ / ‖g_f32‖ of ∂loss/∂x and
∂loss/∂kernel, with TensorFlow's default threads and on one thread (the kernel gradient sums
batch × positions products; where bfloat16 is emulated, one thread sums them all in bfloat16,
several split the sum).
"""

import argparse
import os
import subprocess
import sys

import numpy as np
from machine import describe

OPS = ("conv2d", "conv2d stride 2", "conv2d_transpose stride 2", "matmul")


def errors(batch):
    """{op: (relative error of ∂loss/∂x, of ∂loss/∂kernel)} on a [batch, 14, 14, 3] input."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(size=(batch, 14, 14, 3)), tf.float32)
    ops = {
        "conv2d": (lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"), (3, 3, 3, 5)),
        "conv2d stride 2": (lambda x, k: tf.nn.conv2d(x, k, 2, "SAME"), (3, 3, 3, 5)),
        "conv2d_transpose stride 2": (
            lambda x, k: tf.nn.conv2d_transpose(x, k, [batch, 28, 28, 5], 2, "SAME"),
            (3, 3, 5, 3),
        ),
        "matmul": (lambda x, k: tf.matmul(tf.reshape(x, [-1, 3]), k), (3, 5)),
    }
    result = {}
    for name, (op, kernel_shape) in ops.items():
        kernel = tf.constant(rng.normal(size=kernel_shape), tf.float32)
        gradients = []
        for dtype in (tf.float32, tf.bfloat16):
            xs, ks = tf.cast(x, dtype), tf.cast(kernel, dtype)
            with tf.GradientTape() as tape:
                tape.watch([xs, ks])
                loss = tf.reduce_sum(tf.cast(op(xs, ks), tf.float32))
            gradients.append(
                [tf.cast(g, tf.float32).numpy() for g in tape.gradient(loss, [xs, ks])]
            )
        result[name] = tuple(np.linalg.norm(b - a) / np.linalg.norm(a) for a, b in zip(*gradients))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        for name, (dx, dk) in errors(args.batch).items():
            print(f"RESULT {name}|{dx}|{dk}")
        return
    print(describe())
    print(f"{'op':28} {'threads':>8} {'dloss/dx':>10} {'dloss/dkernel':>14}")
    for threads in (None, 1):
        env = dict(os.environ, **({"TF_NUM_INTRAOP_THREADS": "1"} if threads else {}))
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--batch", str(args.batch)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in out.splitlines():
            if line.startswith("RESULT "):
                name, dx, dk = line[7:].split("|")
                label = "default" if threads is None else "1"
                print(f"{name:28} {label:>8} {float(dx):10.2%} {float(dk):14.2%}")


if __name__ == "__main__":
    main()
