"""Training throughput on MNIST: keras_vae against two references, side by side.

    python benchmarks/train_throughput.py [--repeats 3] [--runs 2] [--no-torch] \
        [--mnist PATH]

(a) the MLP of PyTorch's VAE example (784-400-20-400-784, Bernoulli, Adam 1e-3, batch 128):
    keras_vae (with each speed lever) vs a PyTorch implementation of that example and vs a
    plain Keras subclassed VAE written as the official Keras example writes it; PyTorch's
    mixed precision (bf16 autocast) runs too, beside keras_vae's bf16;
(b) the official Keras example's convolutional VAE (latent 2): keras_vae vs plain Keras.
Every contender trains epochs of the same examples, each in its own fresh process: 1 +
``--runs`` epochs in one ``fit`` call (one loop for PyTorch), as a training run does, timing
each epoch but the first (tracing, XLA compilation). The contenders take turns, ``--repeats``
processes each, and the medians, their ratios to the references, the last epoch's mean
training loss (nats per example) and the achieved FLOP/s as a fraction of this machine's
measured float32 matmul peak are printed. Examples per epoch are a multiple of 128 × 16, so
that every contender's epoch is whole batches and whole executions of 16 steps. Where
TensorFlow sees a GPU, every contender trains on it, PyTorch's too. Data: ``--mnist``
(default ../shared/data/mnist.npz; grayscale in [0, 1], the Bernoulli log-likelihood as
binary cross-entropy, as in both examples). PyTorch is an optional benchmark dependency:
pip install torch==2.13.0.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops
from machine import describe, matmul_peak

from keras_vae import VAE, FusedAdam, networks
from keras_vae.data import training_dataset

BATCH = 128
SPE = 16  # the steps per execution of the levers that use it
BF16 = "mixed_bfloat16"
MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


# ------------------------------------------------------------------ plain Keras reference
class ReferenceSampling(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        epsilon = keras.random.normal(shape=ops.shape(z_mean), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * epsilon


class ReferenceVAE(keras.Model):
    """The official Keras example's VAE class (functional encoder/decoder, custom train_step,
    sigmoid outputs and binary cross-entropy summed over pixels)."""

    def __init__(self, encoder, decoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder, self.decoder = encoder, decoder
        self.total_loss_tracker = keras.metrics.Mean(name="total_loss")

    @property
    def metrics(self):
        return [self.total_loss_tracker]

    def train_step(self, data):
        with tf.GradientTape() as tape:
            z_mean, z_log_var, z = self.encoder(data)
            reconstruction = self.decoder(z)
            reconstruction_loss = ops.mean(
                ops.sum(keras.losses.binary_crossentropy(data, reconstruction), axis=(1, 2))
            )
            kl_loss = -0.5 * (1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))
            total_loss = reconstruction_loss + ops.mean(ops.sum(kl_loss, axis=1))
        grads = tape.gradient(total_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.total_loss_tracker.update_state(total_loss)
        return {"loss": self.total_loss_tracker.result()}


def reference_mlp():
    inputs = keras.Input((28, 28, 1))
    h = layers.Dense(400, activation="relu")(layers.Flatten()(inputs))
    z_mean, z_log_var = layers.Dense(20)(h), layers.Dense(20)(h)
    encoder = keras.Model(inputs, [z_mean, z_log_var, ReferenceSampling()([z_mean, z_log_var])])
    latent = keras.Input((20,))
    h = layers.Dense(400, activation="relu")(latent)
    out = layers.Reshape((28, 28, 1))(layers.Dense(784, activation="sigmoid")(h))
    return ReferenceVAE(encoder, keras.Model(latent, out))


def reference_conv():
    inputs = keras.Input((28, 28, 1))
    x = layers.Conv2D(32, 3, activation="relu", strides=2, padding="same")(inputs)
    x = layers.Conv2D(64, 3, activation="relu", strides=2, padding="same")(x)
    x = layers.Dense(16, activation="relu")(layers.Flatten()(x))
    z_mean, z_log_var = layers.Dense(2)(x), layers.Dense(2)(x)
    encoder = keras.Model(inputs, [z_mean, z_log_var, ReferenceSampling()([z_mean, z_log_var])])
    latent = keras.Input((2,))
    x = layers.Reshape((7, 7, 64))(layers.Dense(7 * 7 * 64, activation="relu")(latent))
    x = layers.Conv2DTranspose(64, 3, activation="relu", strides=2, padding="same")(x)
    x = layers.Conv2DTranspose(32, 3, activation="relu", strides=2, padding="same")(x)
    out = layers.Conv2DTranspose(1, 3, activation="sigmoid", padding="same")(x)
    return ReferenceVAE(encoder, keras.Model(latent, out))


# ------------------------------------------------------------------ contenders
class EpochTimes(keras.callbacks.Callback):
    """The wall time of each epoch of a ``fit``, its last step's result included."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        float(logs["loss"])  # waits for the epoch's last step
        self.times.append(time.perf_counter() - self.start)


class KerasContender:
    """A Keras model trained with one ``fit`` over ``epochs`` epochs of ``examples``."""

    def __init__(
        self, name, model, x, examples, pipeline, optimizer=keras.optimizers.Adam, **compile_kwargs
    ):
        self.name, self.model, self.x, self.pipeline = name, model, x[:examples], pipeline
        model.compile(optimizer=optimizer(1e-3), **compile_kwargs)

    def train(self, epochs):
        """Each epoch's wall time and the last epoch's mean loss."""
        timer = EpochTimes()
        if self.pipeline:  # keras_vae's own stream: stateless shuffle per epoch, prefetch
            data = training_dataset(self.x, BATCH, 0, False, 0, epochs)
            history = self.model.fit(
                data,
                epochs=epochs,
                steps_per_epoch=len(self.x) // BATCH,
                shuffle=False,
                verbose=0,
                callbacks=[timer],
            )
        else:  # as the Keras example calls it: NumPy arrays
            history = self.model.fit(
                self.x, epochs=epochs, batch_size=BATCH, verbose=0, callbacks=[timer]
            )
        return timer.times, history.history["loss"][-1]


class TorchContender:
    """PyTorch's VAE example (MLP 784-400-20-400-784), its loop kept on tensors; with
    ``bf16``, its forward pass and loss under ``torch.autocast`` to bfloat16 (PyTorch's
    mixed precision: float32 weights, the BCE computed in float32)."""

    def __init__(self, x, examples, bf16=False):
        import torch
        from torch import nn

        torch.manual_seed(0)
        torch.set_num_threads(os.cpu_count())
        # The device TensorFlow trains on: a GPU where it sees one, as keras_vae does.
        device = "cuda" if tf.config.list_physical_devices("GPU") else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "TensorFlow trains on the GPU, but this torch build has no "
                "CUDA: install a CUDA build of torch 2.13.0 to compare."
            )

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.fc21, self.fc22 = (
                    nn.Linear(784, 400),
                    nn.Linear(400, 20),
                    nn.Linear(400, 20),
                )
                self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

            def forward(self, x):
                h = torch.relu(self.fc1(x))
                mu, logvar = self.fc21(h), self.fc22(h)
                z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
                return self.fc4(torch.relu(self.fc3(z))), mu, logvar

        self.torch, self.name = torch, "pytorch example"
        self.net = Net().to(device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        self.x = torch.from_numpy(x[:examples].reshape(-1, 784)).to(device)
        self.bf16 = bf16

    def train(self, epochs):
        """Each epoch's wall time and the last epoch's mean loss."""
        times = []
        for _ in range(epochs):
            start = time.perf_counter()
            loss = self.epoch()
            times.append(time.perf_counter() - start)
        return times, loss

    def epoch(self):
        torch = self.torch
        total = 0.0
        for idx in torch.randperm(len(self.x), device=self.x.device).split(BATCH):
            batch = self.x[idx]
            with torch.autocast(self.x.device.type, torch.bfloat16, enabled=self.bf16):
                logits, mu, logvar = self.net(batch)
                # The example's BCE on sigmoid outputs, computed from logits (same value,
                # stable).
                bce = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, batch, reduction="sum"
                )
                kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
                loss = (bce + kld) / len(batch)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(batch)
        return total / len(self.x)


# ------------------------------------------------------------------ FLOPs
def forward_macs(model):
    """Multiply-accumulates of one example's forward pass through Dense/Conv layers."""
    macs = 0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, layers.Dense):
            macs += layer.kernel.shape[0] * layer.kernel.shape[1]
        elif isinstance(layer, layers.Conv2DTranspose):
            h, w = layer.input.shape[1:3]
            macs += h * w * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, layers.Conv2D):
            h, w = layer.output.shape[1:3]
            macs += h * w * int(np.prod(layer.kernel.shape))
    return macs


def ours(arch, dtype=None):
    if arch == "mlp":
        latent_dim, settings = 20, {"hidden_units": (400,)}
    else:
        latent_dim, settings = 2, {"filters": (32, 64), "hidden_units": (16,)}
    encoder, decoder = networks.build(
        arch, (28, 28, 1), latent_dim, dtype=dtype, seed=0, **settings
    )
    return VAE(encoder, decoder, latent_dim=latent_dim, seed=0, dtype=dtype)


# keras_vae alone and with each speed lever: (name, dtype policy, optimizer, compile arguments).
SPE16 = {"steps_per_execution": SPE}
XLA = {"jit_compile": True}
ADAM = keras.optimizers.Adam
LEVERS = [
    ("keras_vae", None, ADAM, {}),
    ("keras_vae +steps_per_execution=16", None, ADAM, SPE16),
    ("keras_vae +XLA", None, ADAM, XLA),
    ("keras_vae +XLA +steps_per_execution=16", None, ADAM, {**XLA, **SPE16}),
    ("keras_vae +FusedAdam", None, FusedAdam, {}),
    ("keras_vae +FusedAdam +steps_per_execution=16", None, FusedAdam, SPE16),
    ("keras_vae +FusedAdam +XLA +steps_per_execution=16", None, FusedAdam, {**XLA, **SPE16}),
    ("keras_vae +FusedAdam +spe=16 +bf16", BF16, FusedAdam, SPE16),
]
PLAIN, TORCH = "plain keras (example style)", "pytorch example"
TORCH_BF16 = "pytorch example +bf16 autocast"


def make_contender(arch, name, x, examples):
    if name == PLAIN:
        model = reference_mlp() if arch == "mlp" else reference_conv()
        return KerasContender(name, model, x, examples, False)
    if name in (TORCH, TORCH_BF16):
        return TorchContender(x, examples, bf16=name == TORCH_BF16)
    _, dtype, optimizer, kwargs = next(lever for lever in LEVERS if lever[0] == name)
    return KerasContender(name, ours(arch, dtype), x, examples, True, optimizer, **kwargs)


def child(arch, name, examples, runs, mnist=MNIST):
    """Trains one contender in this (fresh) process for 1 + ``runs`` epochs and prints its
    median examples/s over the last ``runs`` epochs and its last epoch's mean loss."""
    with np.load(mnist) as data:
        x = (data["x_train"] / 255.0).astype("float32")[..., None]
    times, loss = make_contender(arch, name, x, examples).train(1 + runs)
    print(f"RESULT {examples / statistics.median(times[1:])} {loss}")


def race(arch, title, references, args, peak, others=()):
    """Races the ``references``, the ``others`` and every lever. Each repeat starts every
    contender in a fresh process, in turn: several models in one process share tf.data's and
    TensorFlow's thread pools, and on this 2-core machine that left some of them at half
    speed for their whole life, whichever contender it hit."""
    names = references + list(others) + [lever[0] for lever in LEVERS]
    examples = args.mlp_examples if arch == "mlp" else args.conv_examples
    speeds, losses = {name: [] for name in names}, {}
    for _ in range(args.repeats):
        for name in names:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    arch,
                    name,
                    "--examples",
                    str(examples),
                    "--runs",
                    str(args.runs),
                    "--mnist",
                    str(args.mnist),
                ],
                check=False,
                capture_output=True,
                text=True,
            )
            if out.returncode or "RESULT" not in out.stdout:
                raise RuntimeError(f"{name} ({arch}) failed:\n{out.stderr[-3000:]}")
            speed, losses[name] = map(float, out.stdout.split("RESULT")[-1].split())
            speeds[name].append(speed)
    print(
        f"\n{title}: {examples} examples per epoch; median over {args.repeats} processes of "
        f"each process's median of {args.runs} epochs after its first"
    )
    header = f"{'contender':<46}{'ex/s':>8}" + "".join(f"{'vs ' + r:>31}" for r in references)
    print(header + f"{'loss':>9}{'of peak':>9}")
    speed = {name: statistics.median(s) for name, s in speeds.items()}
    macs = forward_macs(ours(arch))
    for name, s in speed.items():
        ratios = "".join(f"{s / speed[r]:>30.2f}x" for r in references)
        flops = 6 * macs * s  # 2 FLOPs per MAC, backward ≈ 2× forward
        print(f"{name:<46}{s:>8.0f}{ratios}{losses[name]:>9.2f}{flops / peak:>8.1%}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="processes per contender")
    parser.add_argument("--runs", type=int, default=2, help="timed epochs per process")
    parser.add_argument("--mlp-examples", type=int, default=59392, help="examples per epoch")
    parser.add_argument("--conv-examples", type=int, default=12288, help="examples per epoch")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--mnist", type=Path, default=MNIST, help="MNIST .npz file")
    parser.add_argument("--child", nargs=2, metavar=("ARCH", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--examples", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for examples in (args.examples, args.mlp_examples, args.conv_examples):
        if examples is not None and (examples <= 0 or examples % (BATCH * SPE)):
            parser.error(f"examples per epoch must be a positive multiple of {BATCH * SPE}")
    for gpu in tf.config.list_physical_devices("GPU"):
        # Otherwise this process would hold the whole GPU while its children train.
        tf.config.experimental.set_memory_growth(gpu, True)
    if args.child:
        return child(*args.child, args.examples, args.runs, args.mnist)
    peak = matmul_peak()
    print(describe())
    print(
        f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s "
        f"(on TensorFlow's default device; TF32 on GPUs that have it)",
        flush=True,
    )
    torch = [] if args.no_torch else [TORCH]
    race(
        "mlp",
        "(a) MLP 784-400-20-400-784",
        [PLAIN] + torch,
        args,
        peak,
        [TORCH_BF16] if torch else [],
    )
    race("conv", "(b) Keras example conv VAE, latent 2", [PLAIN], args, peak)


if __name__ == "__main__":
    main()
