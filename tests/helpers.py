"""Builders shared by the tests: a VAE of the named families, and a run config from flat
settings, both as `keras-vae train` makes them."""

import contextlib
import dataclasses
import http.server
import json
import math
import threading

import keras
import numpy as np
import tensorflow as tf

from keras_vae.config import SECTIONS, ModelConfig, RunConfig
from keras_vae.fitting import build_model
from keras_vae.settings import validate

SECTION_OF = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def make_vae(data_shape=(8, 8, 1), dtype="float32", **settings):
    """The VAE of ``ModelConfig(**settings)`` for data of ``data_shape``."""
    return build_model(validate(ModelConfig(**settings)), tuple(data_shape), dtype)


def sectioned(flat):
    """{section: {key: value}} of flat settings {key: value}."""
    values = {}
    for key, value in flat.items():
        values.setdefault(SECTION_OF.get(key, "unknown"), {})[key] = value
    return values


def run_config(**flat):
    """The default run config with the flat settings applied, checked."""
    return RunConfig().replace(sectioned(flat))


def posterior_params(model, x):
    """(μ_φ(x), log σ²_φ(x)) of a model with the diagonal Gaussian posterior."""
    params = model.encode_params(x)
    return params["z_mean"], params["z_log_var"]


@keras.saving.register_keras_serializable(package="tests")
class Scale(keras.layers.Layer):
    """A user's own layer: x · s, s one learned scalar."""

    def build(self, input_shape):
        self.s = self.add_weight(shape=(), initializer="ones", name="s")

    def call(self, x):
        return x * self.s


def user_networks(data_shape=(8, 8, 1), latent_dim=2, width=32):
    """A hand-written keras.Sequential encoder (x → features) and decoder (z → logits),
    one of the user's own layers in each."""
    encoder = keras.Sequential(
        [
            keras.Input(data_shape),
            keras.layers.Flatten(),
            Scale(),
            keras.layers.Dense(width, activation="relu"),
        ],
        name="my_encoder",
    )
    decoder = keras.Sequential(
        [
            keras.Input((latent_dim,)),
            keras.layers.Dense(width, activation="relu"),
            Scale(),
            keras.layers.Dense(math.prod(data_shape)),
            keras.layers.Reshape(data_shape),
        ],
        name="my_decoder",
    )
    return encoder, decoder


@contextlib.contextmanager
def json_server(respond):
    """A loopback HTTP server whose POST replies with ``respond(path, headers, body)``: a
    mapping sent as JSON with status 200, or a tuple (status, bytes, content type) sent as
    it is; yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            reply = respond(self.path, self.headers, body)
            if isinstance(reply, tuple):
                status, data, content_type = reply
            else:
                status, data, content_type = 200, json.dumps(reply).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def rest_stand_in(signatures):
    """A ``json_server`` reply function that answers TF Serving's REST predict requests
    (row or columnar format) with the SavedModel ``signatures``."""
    import tensorflow as tf

    def respond(path, headers, body):
        fn = signatures[body["signature_name"]]
        if "instances" in body:  # row format: one dict of inputs per row
            names = list(body["instances"][0])
            inputs = {n: [row[n] for row in body["instances"]] for n in names}
        else:
            inputs = body["inputs"]
        arg_specs = fn.structured_input_signature[1]
        outputs = fn(**{n: tf.constant(v, arg_specs[n].dtype) for n, v in inputs.items()})
        outputs = {k: v.numpy().tolist() for k, v in outputs.items()}
        if "instances" not in body:
            return {"outputs": outputs}
        rows = len(next(iter(outputs.values())))
        return {"predictions": [{k: v[i] for k, v in outputs.items()} for i in range(rows)]}

    return respond


def assert_trains_saves_loads_and_serves(model, x, tmp_path):
    """Fits ``model`` one epoch on x, then asserts that its ``.keras`` file restores every
    weight, that the restored and the served (SavedModel ``score`` and ``sample``) numbers
    equal the in-memory model's; returns the fit's history."""
    from keras_vae.export import SCORE_SAMPLES, export_model, score_epsilon

    model.compile(optimizer="adam")
    history = model.fit(x, epochs=1, batch_size=16, verbose=0).history
    path = tmp_path / "m.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    for a, b in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    epsilon = score_epsilon(model.latent_dim)
    expected = model.score(x[:4], SCORE_SAMPLES, epsilon=epsilon)
    again = restored.score(x[:4], SCORE_SAMPLES, epsilon=epsilon)
    served = tf.saved_model.load(str(export_model(model, tmp_path / "export", "m")))
    scored = served.signatures["score"](x=tf.constant(x[:4]))
    sampled = served.signatures["sample"](seed=tf.constant([5, 6], tf.int64))
    for key in ("elbo", "log_px"):
        np.testing.assert_allclose(again[key].numpy(), expected[key].numpy(), rtol=1e-5)
        np.testing.assert_allclose(scored[key].numpy(), expected[key].numpy(), rtol=1e-4)
    z = np.stack([model.sample_prior(1, seed=(s, 0)).numpy()[0] for s in (5, 6)])
    np.testing.assert_allclose(sampled["z"].numpy(), z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        sampled["mean"].numpy(), model.decode(z).mean().numpy(), rtol=1e-5, atol=1e-6
    )
    return history
