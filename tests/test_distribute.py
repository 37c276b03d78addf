"""tf.distribute and mixed precision: the same training on several devices and workers."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from keras_vae.cli import main
from keras_vae.train import read_history

MIRRORED = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from keras_vae import VAE
    from keras_vae.data import load
    x = load("digits").x_train[:521]

    def run(strategy):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = VAE((8, 8, 1), latent_dim=4, hidden_units=(32,), seed=0)
            # SGD: its steps scale with the gradient, so a loss averaged over the wrong
            # batch size would show (Adam's would not).
            model.compile(optimizer=keras.optimizers.SGD(0.01))
        # global batch 64: 32 per replica under MirroredStrategy (and 9 = 5 + 4 at the end)
        history = model.fit(tf.data.Dataset.from_tensor_slices(x).batch(64), epochs=3,
                            shuffle=False, verbose=0)
        return history.history["loss"], [w.numpy().tolist() for w in model.trainable_weights]

    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    one = run(tf.distribute.OneDeviceStrategy(devices[0]))
    two = run(tf.distribute.MirroredStrategy(devices))
    json.dump({"one": one, "two": two, "replicas": len(devices)}, open(sys.argv[1], "w"))
""")


def test_mirrored_on_two_devices_matches_one_device(tmp_path):
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, "-c", MIRRORED, str(out)], check=True,
                   capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["replicas"] == 2
    (loss_one, weights_one), (loss_two, weights_two) = result["one"], result["two"]
    np.testing.assert_allclose(loss_two, loss_one, rtol=1e-5)
    for a, b in zip(weights_one, weights_two):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
def test_gaussian_means_stay_float32_under_mixed_precision(architecture):
    """μ = b exactly (zero output kernel; b = 0.3, which bfloat16 rounds to 0.30078) and
    σ = 10⁻³: log p(x = b | z) = −D (log σ + ½ log 2π) in closed form. A 16-bit output
    layer would miss it by D (7.8·10⁻⁴)²/(2σ²) ≈ 19 nats."""
    from keras_vae import VAE

    model = VAE((8, 8, 1), latent_dim=4, architecture=architecture, hidden_units=(16,),
                filters=(4, 8), likelihood="gaussian", learn_sigma="per_pixel", sigma=1e-3,
                dtype="mixed_bfloat16", seed=0)
    output = [layer for layer in model.decoder_network.layers if hasattr(layer, "kernel")][-1]
    output.kernel.assign(np.zeros(output.kernel.shape, "float32"))
    output.bias.assign(np.full(output.bias.shape, 0.3, "float32"))
    x = np.full((2, 8, 8, 1), 0.3, "float32")
    log_px = model.decode(np.ones((2, 4), "float32")).log_prob(x).numpy()
    sigma = np.exp(np.float32(np.log(1e-3)))  # σ as stored, log σ in float32
    np.testing.assert_allclose(log_px, -64 * (np.log(sigma) + 0.5 * np.log(2 * np.pi)),
                               rtol=1e-5)


DROPOUT = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from keras_vae.sampling import Dropout
    strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    with strategy.scope():
        layer = Dropout(0.5, seed=3)
        layer.build((4, 256))
    step = tf.function(lambda: strategy.run(lambda: layer(tf.ones((4, 256)), training=True)))
    masks = [[r.numpy().tolist() for r in strategy.experimental_local_results(step())]
             for _ in range(2)]
    # A noise shape with an unknown batch: one mask value per row.
    with strategy.scope():
        rows = Dropout(0.5, noise_shape=(None, 1), seed=4)
    row_step = tf.function(lambda x: strategy.run(lambda x: rows(x, training=True), (x,)),
                           input_signature=[tf.TensorSpec((None, 8))])
    by_row = [r.numpy().tolist() for r in
              strategy.experimental_local_results(row_step(tf.ones((64, 8))))]
    json.dump({"masks": masks, "by_row": by_row}, open(sys.argv[1], "w"))
""")


def test_dropout_masks_differ_between_replicas(tmp_path):
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, "-c", DROPOUT, str(out)], check=True,
                   capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    (first, second), (third, _) = np.array(result["masks"])
    for mask in (first, second, third):  # inverted dropout of ones at rate ½: 0 or 2
        assert set(np.unique(mask)) == {0.0, 2.0}
        assert abs((mask == 0).mean() - 0.5) < 0.1
    # Same seed state on both replicas, yet independent masks: they agree on about half
    # the 1,024 units, not all of them; and the next step draws new ones.
    assert abs((first == second).mean() - 0.5) < 0.1
    assert abs((first == third).mean() - 0.5) < 0.1
    for mask in np.array(result["by_row"]):  # each replica's 32 rows of 8
        assert np.all(mask == mask[:, :1]) and set(np.unique(mask)) == {0.0, 2.0}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_worker_trains_with_two_processes(tmp_path):
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    common = ["train", "--epochs", "2", "--hidden-units", "32", "--latent-dim", "2",
              "--batch-size", "128", "--quiet", "--plots", "false"]
    args = ["-m", "keras_vae.cli", *common, "--strategy", "multi_worker",
            "--run-dir", str(tmp_path / "run"), "--export-dir", str(tmp_path / "sm")]
    workers = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen([sys.executable, *args], env=env, cwd=tmp_path,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        outputs = [w.communicate(timeout=240)[0].decode() for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    # The chief (worker 0) writes the run; both trained every epoch.
    history = read_history(tmp_path / "run" / "history.csv")
    assert "elbo" in history and len(history["loss"]) == 2
    assert (tmp_path / "sm" / "vae" / "1" / "saved_model.pb").is_file()
    assert not (tmp_path / "sm" / "vae" / "2").exists()  # only the chief exported
    # Each global batch of 128 was split between the workers and the loss averaged over
    # all 128: the same training as one process with the same seed and batch.
    assert main([*common, "--run-dir", str(tmp_path / "one"),
                 "--export-dir", str(tmp_path / "sm_one")]) == 0
    one = read_history(tmp_path / "one" / "history.csv")
    np.testing.assert_allclose(history["loss"], one["loss"], rtol=1e-4)


def test_mixed_precision_trains_and_exports_float32(tmp_path):
    assert main(["train", "--precision", "mixed_float16", "--epochs", "2", "--hidden-units",
                 "32", "--latent-dim", "3", "--quiet", "--plots", "false",
                 "--run-dir", str(tmp_path / "run"), "--export-dir", str(tmp_path / "sm")]) == 0
    import keras

    model = keras.saving.load_model(tmp_path / "run" / "checkpoints" / "last.keras")
    assert model.encoder_network.layers[1].dtype_policy.name == "mixed_float16"
    assert model.decoder_network.layers[-2].dtype_policy.name == "mixed_float16"  # output
    assert model.decode(tf.zeros((2, 3))).distribution.logits.dtype == tf.float32
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(history) == 3
    loaded = tf.saved_model.load(str(tmp_path / "sm" / "vae" / "1"))
    x = tf.constant(np.random.default_rng(0).uniform(size=(2, 8, 8, 1)).astype("float32"))
    for name in ("serving_default", "score"):
        for value in loaded.signatures[name](x=x).values():
            assert value.dtype == tf.float32 and np.all(np.isfinite(value.numpy()))
    assert keras.config.dtype_policy().name == "float32"  # the global policy is untouched


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_computes_the_float32_models_elbo(architecture, precision):
    """The same weights and noise give the same per-example ELBO terms in float32 and under
    a mixed policy, up to the 16-bit rounding of the networks' activations (bfloat16 keeps
    8 significant bits, float16 11)."""
    import keras

    from keras_vae import VAE
    from keras_vae.data import load

    keras.utils.set_random_seed(0)
    x = load("digits").x_test[:64]
    models = [VAE((8, 8, 1), latent_dim=4, architecture=architecture, hidden_units=(32,),
                  filters=(8, 16), seed=0, dtype=dtype) for dtype in ("float32", precision)]
    models[1].set_weights(models[0].get_weights())
    epsilon = np.random.default_rng(0).normal(size=(1, 64, 4)).astype("float32")
    (log_px32, _, _, kl32), (log_px16, _, _, kl16) = (
        model.log_weights(x, epsilon=epsilon, densities=False) for model in models)
    assert log_px16.dtype == kl16.dtype == tf.float32
    # At least 5 times the largest differences seen (log p(x|z) is about −45 nats here).
    rtol, atol = (3e-3, 0.05) if precision == "mixed_bfloat16" else (5e-4, 0.01)
    np.testing.assert_allclose(log_px16, log_px32, rtol=rtol)
    np.testing.assert_allclose(kl16, kl32, atol=atol)
    assert not np.array_equal(log_px16, log_px32)  # it really ran in 16 bits
