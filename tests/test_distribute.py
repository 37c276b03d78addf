"""tf.distribute and mixed precision: the same training on several devices and workers."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from keras_vae.cli import main
from keras_vae.rundir import read_history

MIRRORED = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from keras_vae import VAE, networks
    from keras_vae.data import load
    from keras_vae.hierarchy import HierarchicalPrior, LadderPosterior
    x = load("digits").x_train[:521]

    def run(strategy):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            encoder, decoder = networks.build("mlp", (8, 8, 1), 4, hidden_units=(32,), seed=0)
            pieces = {}
            if sys.argv[2] == "ladder":  # two stochastic layers, q sharing p's networks
                pieces = {"prior": HierarchicalPrior((2, 2), (8,)),
                          "posterior": LadderPosterior((2, 2), (8,), seed=0)}
            model = VAE(encoder, decoder, latent_dim=4, seed=0, **pieces)
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


@pytest.mark.slow
@pytest.mark.parametrize("latent", ["one_layer", "ladder"])
def test_mirrored_on_two_devices_matches_one_device(latent, tmp_path):
    out = tmp_path / "out.json"
    subprocess.run(
        [sys.executable, "-c", MIRRORED, str(out), latent],
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    assert result["replicas"] == 2
    (loss_one, weights_one), (loss_two, weights_two) = result["one"], result["two"]
    np.testing.assert_allclose(loss_two, loss_one, rtol=1e-5)
    for a, b in zip(weights_one, weights_two):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


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
    subprocess.run(
        [sys.executable, "-c", DROPOUT, str(out)], check=True, capture_output=True, timeout=300
    )
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


@pytest.mark.slow
def test_multi_worker_trains_with_two_processes(tmp_path):
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    common = [
        "train",
        "--epochs",
        "2",
        "--hidden-units",
        "32",
        "--latent-dim",
        "2",
        "--batch-size",
        "128",
        "--quiet",
        "--plots",
        "false",
    ]
    args = [
        "-m",
        "keras_vae.cli",
        *common,
        "--strategy",
        "multi_worker",
        "--run-dir",
        str(tmp_path / "run"),
        "--export-dir",
        str(tmp_path / "sm"),
    ]
    workers = []
    for index in range(2):
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
        }
        workers.append(
            subprocess.Popen(
                [sys.executable, *args],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
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
    assert (
        main(
            [*common, "--run-dir", str(tmp_path / "one"), "--export-dir", str(tmp_path / "sm_one")]
        )
        == 0
    )
    one = read_history(tmp_path / "one" / "history.csv")
    np.testing.assert_allclose(history["loss"], one["loss"], rtol=1e-4)
