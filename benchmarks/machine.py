"""The machine a benchmark ran on: one line naming it and its library versions, and its
measured float32 matmul peak."""

import os
import time
from importlib import metadata

from keras_vae.hardware import cpu_model


def describe():
    """ "CPU <model>, <n> cores; GPUs: …; tensorflow x, keras y, …" for the installed ones."""
    import tensorflow as tf

    gpus = [
        tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
        for gpu in tf.config.list_physical_devices("GPU")
    ]
    versions = []
    for package in ("tensorflow", "keras", "tensorflow-probability", "torch"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return (
        f"CPU {cpu_model()}, {os.cpu_count()} cores; GPUs: {', '.join(gpus) or 'none'}; "
        + ", ".join(versions)
    )


def matmul_peak(n=2048, repeats=20):
    """FLOP/s of an n × n float32 matmul on TensorFlow's default device."""
    import tensorflow as tf

    a = tf.random.normal((n, n))
    matmul = tf.function(lambda a: tf.matmul(a, a))
    matmul(a).numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        out = matmul(a)
    out.numpy()
    return 2 * n**3 * repeats / (time.perf_counter() - start)
