"""What mixed precision does to the ELBO: the same weights and noise, float32 against each
mixed dtype policy.

    python benchmarks/precision_elbo.py [--arch mlp|conv] [--epochs 5] [--images 2000] \
        [--mnist PATH]

Trains a model in float32 on MNIST (``--mnist``, default ../shared/data/mnist.npz;
dynamically binarized; the MLP and conv net of benchmarks/train_throughput.py), rebuilds it
under ``mixed_bfloat16`` and ``mixed_float16`` with the same weights, and computes each
example's one-sample ELBO log p_θ(x|z) − KL(q_φ(z|x) ‖ p(z)) on the first ``--images`` test
images (binarized once, as the MNIST table's test set) with the same ε for every policy.
Prints, per policy, the mean ELBO, its mean difference from float32, the per-image standard
deviation of that difference and its largest magnitude, in nats.
"""

import argparse
from pathlib import Path

import keras
import numpy as np
from machine import describe
from train_throughput import BATCH, MNIST, ours

from keras_vae import FusedAdam
from keras_vae.data import binarize_once, training_dataset


def elbo(model, x, epsilon, batch=500):
    """Per-example log p_θ(x|z) − KL for z = μ + σ ⊙ ε."""
    parts = []
    for i in range(0, len(x), batch):
        log_px, _, _, kl = model.log_weights(
            x[i : i + batch], epsilon=epsilon[:, i : i + batch], densities=False
        )
        parts.append((log_px[0] - kl).numpy())
    return np.concatenate(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=("mlp", "conv"), default="mlp")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--mnist", type=Path, default=MNIST, help="MNIST .npz file")
    args = parser.parse_args()
    print(describe(), flush=True)
    with np.load(args.mnist) as data:
        x_train = (data["x_train"] / 255.0).astype("float32")[..., None]
        x_test = binarize_once((data["x_test"][: args.images] / 255.0).astype("float32")[..., None])

    keras.utils.set_random_seed(0)
    model = ours(args.arch, "float32")
    model.compile(optimizer=FusedAdam(1e-3))
    steps = -(-len(x_train) // BATCH)
    model.fit(
        training_dataset(x_train, BATCH, 0, True, 0, args.epochs),
        epochs=args.epochs,
        steps_per_epoch=steps,
        verbose=2,
    )
    epsilon = np.random.default_rng(1).normal(size=(1, len(x_test), model.latent_dim))
    epsilon = epsilon.astype("float32")
    reference = elbo(model, x_test, epsilon)
    print(
        f"\n{args.arch}, {args.epochs} epochs in float32; one-sample ELBO of "
        f"{len(x_test)} test images, nats"
    )
    print(f"{'policy':<16}{'ELBO':>10}{'mean diff':>11}{'SD diff':>9}{'max |diff|':>11}")
    print(f"{'float32':<16}{reference.mean():>10.3f}")
    for policy in ("mixed_bfloat16", "mixed_float16"):
        mixed = ours(args.arch, policy)
        mixed.set_weights(model.get_weights())
        diff = elbo(mixed, x_test, epsilon) - reference
        print(
            f"{policy:<16}{reference.mean() + diff.mean():>10.3f}{diff.mean():>+11.4f}"
            f"{diff.std():>9.4f}{np.abs(diff).max():>11.3f}"
        )


if __name__ == "__main__":
    main()
