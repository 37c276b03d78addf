"""Latency of an exported SavedModel's signatures, as TF Serving would run them (CPU here),
and peak memory of training and of a K = 5000 evaluation.

    python benchmarks/serve_latency.py [SAVED_MODEL_DIR] [--repeats N] [--memory] \
        [--mnist PATH]

Prints the SavedModel's size and p50/p99 latency per call of ``serving_default`` (and
``score``) at batch 1 and 256, beside the reference: the same reconstruction through Keras'
own inference path, ``model.predict_on_batch``, on the model rebuilt from the export's config
(same architecture, so the same work). SAVED_MODEL_DIR defaults to the newest version under
saved_models/vae/. With ``--memory`` it also prints the peak resident memory of three
fresh processes: importing keras_vae (the baseline), ``keras-vae train`` for one epoch of
the IWAE paper's MNIST MLP (``--mnist``, default ../shared/data/mnist.npz), and
``keras-vae evaluate --k 5000`` on 1000 of that run's test images (memory does not grow with
the number of images).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from machine import describe

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


def percentiles(fn, repeats):
    fn()  # warm-up: tracing and first-call allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return np.percentile(times, 50) * 1e3, np.percentile(times, 99) * 1e3


def peak_rss_mb(command):
    """Peak resident memory (MB) of a child process running ``command``."""
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{command} failed with exit code {child.returncode}")
    return usage.ru_maxrss / 1024


def memory_report(mnist=MNIST):
    cli = [sys.executable, "-m", "keras_vae.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            ("import keras_vae (baseline)", [sys.executable, "-c", "import keras_vae"]),
            (
                "train MNIST 784-200-200-50, 1 epoch",
                cli
                + [
                    "train",
                    "--data",
                    f"npz:{mnist}",
                    "--hidden-units",
                    "200,200",
                    "--latent-dim",
                    "50",
                    "--batch-size",
                    "100",
                    "--epochs",
                    "1",
                    "--plots",
                    "false",
                    "--quiet",
                    "--run-dir",
                    f"{tmp}/run",
                    "--export-dir",
                    f"{tmp}/sm",
                ],
            ),
            (
                "evaluate 1000 MNIST tests, K = 5000",
                cli
                + [
                    "evaluate",
                    f"{tmp}/run",
                    "--k",
                    "5000",
                    "--limit",
                    "1000",
                    "--output",
                    f"{tmp}/r.json",
                ],
            ),
        ]
        print(f"\n{'process':<40}{'peak RSS MB':>12}")
        for name, command in rows:
            print(f"{name:<40}{peak_rss_mb(command):>12.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("saved_model", nargs="?")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument(
        "--mnist", type=Path, default=MNIST, help="MNIST .npz file for --memory's training run"
    )
    args = parser.parse_args()
    print(describe(), flush=True)
    if args.saved_model is None:
        versions = sorted(
            (p for p in Path("saved_models/vae").glob("*") if p.name.isdigit()),
            key=lambda p: int(p.name),
        )
        if not versions:
            raise SystemExit("no export under saved_models/vae: run `python train.py` first")
        path = versions[-1]
    else:
        path = Path(args.saved_model)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    loaded = tf.saved_model.load(str(path))
    signatures = loaded.signatures
    shape = signatures["encode"].structured_input_signature[1]["x"].shape[1:]
    print(f"SavedModel {path}: {size / 1e6:.2f} MB on disk, input shape {tuple(shape)}")
    print(f"{'call':<36}{'batch':>6}{'p50 ms':>10}{'p99 ms':>10}")
    from keras_vae import VAE

    meta = json.loads((path / "assets.extra" / "keras_vae.json").read_text())
    reference = VAE.from_config(meta["config"])
    rng = np.random.default_rng(0)
    for batch in (1, 256):
        x = tf.constant(rng.uniform(size=(batch,) + tuple(shape)).astype("float32"))
        rows = [
            (name, lambda name=name, x=x: signatures[name](x=x))
            for name in ("serving_default", "score")
        ]
        rows.append(
            ("keras predict_on_batch (reference)", lambda x=x: reference.predict_on_batch(x))
        )
        for name, fn in rows:
            p50, p99 = percentiles(fn, args.repeats)
            print(f"{name:<36}{batch:>6}{p50:>10.3f}{p99:>10.3f}")
    if args.memory:
        memory_report(args.mnist)


if __name__ == "__main__":
    main()
