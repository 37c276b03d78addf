"""Training throughput on MNIST: keras_vae against two references, side by side.

    python benchmarks/train_throughput.py [--repeats 3] [--epochs-mlp 1] [--conv-examples 12800]

(a) the MLP of PyTorch's VAE example (784-400-20-400-784, Bernoulli, Adam 1e-3, batch 128):
    keras_vae (with each speed lever) vs a PyTorch implementation of that example and vs a
    plain Keras subclassed VAE written as the official Keras example writes it;
(b) the official Keras example's convolutional VAE (latent 2): keras_vae vs plain Keras.
Every contender trains the same number of examples per timed run; the runs alternate between
contenders, repeat ``--repeats`` times, and the medians, their ratios to the references, the
last run's mean training loss (nats per example) and the achieved FLOP/s as a fraction of
this machine's measured float32 matmul peak are printed. The first epoch of each contender
(tracing, XLA compilation) is not timed. Data: ../shared/data/mnist.npz (grayscale in [0, 1],
the Bernoulli log-likelihood as binary cross-entropy, as in both examples). PyTorch is an
optional benchmark dependency: pip install torch==2.13.0.
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from keras_vae import VAE
from keras_vae.data import training_dataset

BATCH = 128
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
            reconstruction_loss = ops.mean(ops.sum(
                keras.losses.binary_crossentropy(data, reconstruction), axis=(1, 2)))
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
class KerasContender:
    """A Keras model trained with fit on ``examples`` examples per timed run."""

    def __init__(self, name, model, x, examples, pipeline, **compile_kwargs):
        self.name, self.model, self.x, self.examples = name, model, x, examples
        self.pipeline = pipeline
        model.compile(optimizer=keras.optimizers.Adam(1e-3), **compile_kwargs)
        self.epoch = 0
        self.run()  # warm-up: tracing and compilation

    def run(self):
        x = self.x[: self.examples]
        if self.pipeline:  # keras_vae's own stream: stateless shuffle per epoch, prefetch
            data = training_dataset(x, BATCH, 0, False, self.epoch, self.epoch + 1)
            history = self.model.fit(data, epochs=1, steps_per_epoch=-(-len(x) // BATCH),
                                     shuffle=False, verbose=0)
        else:  # as the Keras example calls it: NumPy arrays
            history = self.model.fit(x, epochs=1, batch_size=BATCH, verbose=0)
        self.epoch += 1
        return history.history["loss"][-1]


class TorchContender:
    """PyTorch's VAE example (MLP 784-400-20-400-784), its loop kept on tensors."""

    def __init__(self, x, examples):
        import torch
        from torch import nn

        torch.manual_seed(0)
        torch.set_num_threads(os.cpu_count())

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), \
                    nn.Linear(400, 20)
                self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

            def forward(self, x):
                h = torch.relu(self.fc1(x))
                mu, logvar = self.fc21(h), self.fc22(h)
                z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
                return self.fc4(torch.relu(self.fc3(z))), mu, logvar

        self.torch, self.name = torch, "pytorch example"
        self.net = Net()
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        self.x = torch.from_numpy(x[:examples].reshape(-1, 784))
        self.examples = examples
        self.run()

    def run(self):
        torch = self.torch
        total = 0.0
        for idx in torch.randperm(len(self.x)).split(BATCH):
            batch = self.x[idx]
            logits, mu, logvar = self.net(batch)
            # The example's BCE on sigmoid outputs, computed from logits (same value, stable).
            bce = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, batch, reduction="sum")
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


def matmul_peak(n=2048, repeats=20):
    a = tf.random.normal((n, n))
    matmul = tf.function(lambda a: tf.matmul(a, a))
    matmul(a).numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        out = matmul(a)
    out.numpy()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def race(title, contenders, references, repeats, macs, peak):
    times = {c.name: [] for c in contenders}
    losses = {}
    for _ in range(repeats):
        for c in contenders:  # alternate, so drifts in machine load hit everyone
            start = time.perf_counter()
            losses[c.name] = c.run()
            times[c.name].append(time.perf_counter() - start)
    print(f"\n{title}: {contenders[0].examples} examples per run, median of {repeats}")
    header = f"{'contender':<40}{'ex/s':>10}" + "".join(f"{'vs ' + r:>22}" for r in references)
    print(header + f"{'loss':>10}{'of peak':>10}")
    speed = {name: contenders[0].examples / statistics.median(t) for name, t in times.items()}
    for name, s in speed.items():
        ratios = "".join(f"{s / speed[r]:>21.2f}x" for r in references)
        flops = 6 * macs * s  # 2 FLOPs per MAC, backward ≈ 2× forward
        print(f"{name:<40}{s:>10.0f}{ratios}{losses[name]:>10.2f}{flops / peak:>9.1%}")


def ours(arch):
    if arch == "mlp":
        return VAE((28, 28, 1), latent_dim=20, hidden_units=(400,), seed=0)
    return VAE((28, 28, 1), latent_dim=2, architecture="conv", filters=(32, 64),
               hidden_units=(16,), seed=0)


def levers(arch, x, n):
    """keras_vae alone and with each speed lever: steps_per_execution, XLA, both."""
    return [
        KerasContender("keras_vae", ours(arch), x, n, True),
        KerasContender("keras_vae +steps_per_execution=16", ours(arch), x, n, True,
                       steps_per_execution=16),
        KerasContender("keras_vae +XLA", ours(arch), x, n, True, jit_compile=True),
        KerasContender("keras_vae +XLA +steps_per_execution=16", ours(arch), x, n, True,
                       jit_compile=True, steps_per_execution=16),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mlp-examples", type=int, default=60000)
    parser.add_argument("--conv-examples", type=int, default=12800)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    with np.load(MNIST) as data:
        x = (data["x_train"] / 255.0).astype("float32")[..., None]
    peak = matmul_peak()
    print(f"TF {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs, "
          f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s")


    n = args.mlp_examples
    mlp = [KerasContender("plain keras (example style)", reference_mlp(), x, n, False)]
    if not args.no_torch:
        mlp.append(TorchContender(x, n))
    mlp += levers("mlp", x, n)
    references = ["plain keras (example style)"] + ([] if args.no_torch else ["pytorch example"])
    macs = forward_macs(ours("mlp"))
    race("(a) MLP 784-400-20-400-784", mlp, references, args.repeats, macs, peak)

    n = args.conv_examples
    conv = [KerasContender("plain keras (example style)", reference_conv(), x, n, False)]
    conv += levers("conv", x, n)
    macs = forward_macs(ours("conv"))
    race("(b) Keras example conv VAE, latent 2", conv, ["plain keras (example style)"],
         args.repeats, macs, peak)


if __name__ == "__main__":
    main()
