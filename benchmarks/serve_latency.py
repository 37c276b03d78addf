"""Latency of an exported SavedModel's signatures, as TF Serving would run them (CPU here).

    python benchmarks/serve_latency.py [SAVED_MODEL_DIR] [--repeats N]

Prints the SavedModel's size and p50/p99 latency per call of ``serving_default`` (and
``score``) at batch 1 and 256, beside the reference: the same reconstruction through Keras'
own inference path, ``model.predict_on_batch``, on the model rebuilt from the export's config
(same architecture, so the same work). SAVED_MODEL_DIR defaults to the newest version under
saved_models/vae/.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tensorflow as tf


def percentiles(fn, repeats):
    fn()  # warm-up: tracing and first-call allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return np.percentile(times, 50) * 1e3, np.percentile(times, 99) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("saved_model", nargs="?")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    if args.saved_model is None:
        versions = sorted((p for p in Path("saved_models/vae").glob("*") if p.name.isdigit()),
                          key=lambda p: int(p.name))
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
        rows = [(name, lambda name=name, x=x: signatures[name](x=x))
                for name in ("serving_default", "score")]
        rows.append(("keras predict_on_batch (reference)",
                     lambda x=x: reference.predict_on_batch(x)))
        for name, fn in rows:
            p50, p99 = percentiles(fn, args.repeats)
            print(f"{name:<36}{batch:>6}{p50:>10.3f}{p99:>10.3f}")


if __name__ == "__main__":
    main()
