"""SavedModel export in TF Serving's layout: ``EXPORT_DIR/NAME/VERSION/``.

Signatures (every input has a leading batch dimension, so TF Serving's row format works; a
conditional model's each take labels ``y`` as well: int64 classes [n] or float32 vectors
[n, C]):
- ``serving_default``: x → reconstruction and the posterior's parameters (z_mean, z_log_var)
- ``encode``:  x → the posterior's parameters (z_mean, z_log_var for the diagonal Gaussian;
               a hierarchical posterior's, the layer drawn first and what it adds)
- ``decode``:  z → mean (probabilities for Bernoulli) and the likelihood's parameters
               (``logits``, or ``loc`` and ``scale``), each of the data's shape; for an
               autoregressive decoder, along the greedy path x_d = 1[p(x_d | x_<d, z) > ½]
- ``sample``:  seed (int64, one per row) → z ~ p(z) drawn statelessly from the seed, and
               the mean E[x | z] (autoregressive: along a draw x ~ p_θ(x|z), its noise
               from the same seed); the same seed always gives the same row
- ``score``:   x → elbo and log_px (nats), from SCORE_SAMPLES fixed draws ε_k shared by all
               rows (``score_epsilon``): each example's score depends on that example alone,
               and is reproducible; rows are scored SCORE_CHUNK at a time, so a request's
               memory is that of SCORE_CHUNK × SCORE_SAMPLES decoder evaluations whatever
               its batch size

NAME must be a plain name (``check_model_name``). Each export writes into a temporary
``NAME/.export-<pid>-<random>`` folder; one left by a process that no longer runs (killed
mid-export) is removed by the next export into NAME.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from keras_vae import files

SCORE_SAMPLES = 256
SCORE_CHUNK = 64
SCORE_SEED = (2024, 5)
SERVING_SIGNATURES = ("serving_default", "encode", "decode", "sample", "score")
_TEMP_PREFIX = ".export-"
_TEMP_NAME = re.compile(r"\.export-([0-9]+)-.*", re.DOTALL)


def check_model_name(name):
    """``name`` itself if it is a plain model name: one or more ASCII letters, digits, ``.``,
    ``_`` or ``-``, and not ``.`` or ``..``; otherwise raises ValueError naming it.

    The name becomes a folder under the export directory and a quoted string in
    ``models.config``, so anything else could leave that folder or break the file."""
    if not files.is_plain_name(name):
        raise ValueError(f"model name {name!r} must be {files.PLAIN_NAME_RULE}")
    return name


def score_epsilon(latent_dim):
    """The ``score`` signature's SCORE_SAMPLES = K fixed draws ε_k, shape [K, 1, latent_dim]:
    antithetic pairs (ε, −ε), whitened so that (1/K) Σ_k ε_k = 0 and (1/K) Σ_k ε_k ε_kᵀ = I
    exactly (where K/2 < latent_dim, only its diagonal: each ε_j has (1/K) Σ_k ε_kj² = 1).

    Draws shared by all rows put the same error into every row's score, and plain normal
    draws have a second moment off by O(1/√K); with N(0, I)'s first two moments matched,
    E_q[log p_θ(x|z)] is exact for a Gaussian posterior and a decoder linear in z
    (saved_models/README.md)."""
    half_k = SCORE_SAMPLES // 2
    half = tf.random.stateless_normal((half_k, latent_dim), seed=SCORE_SEED, dtype=tf.float64)
    if latent_dim <= half_k:
        # h ← h L⁻ᵀ with L Lᵀ = hᵀh / (K/2): then hᵀh / (K/2) = I.
        cholesky = tf.linalg.cholesky(tf.matmul(half, half, transpose_a=True) / half_k)
        half = tf.transpose(tf.linalg.triangular_solve(cholesky, tf.transpose(half)))
    else:
        half = half / tf.sqrt(tf.reduce_mean(tf.square(half), axis=0))
    return tf.cast(tf.concat([half, -half], axis=0)[:, None, :], tf.float32)


def label_spec(model):
    """The served input y of a conditional model: int64 classes [n] or float32 vectors
    [n, C]."""
    if model.config.num_classes:
        return tf.TensorSpec((None,), tf.int64, name="y")
    return tf.TensorSpec((None, model.config.condition_dim), tf.float32, name="y")


def serving_functions(model):
    """The served ``tf.function``s of ``model``, by signature name."""
    x_spec = tf.TensorSpec((None,) + model.data_shape, tf.float32, name="x")
    z_spec = tf.TensorSpec((None, model.latent_dim), tf.float32, name="z")
    seed_spec = tf.TensorSpec((None,), tf.int64, name="seed")
    epsilon = score_epsilon(model.latent_dim)
    # A conditional model's signatures take labels y after their other input.
    y_specs = [label_spec(model)] if model.conditional else []

    def signature(*specs):
        return tf.function(input_signature=list(specs) + y_specs)

    # Signature calls do not check shapes; a wrong one must fail here, with the expected
    # shape in the message, rather than deep inside a matmul.
    def checked_x(x):
        return model.validated(tf.ensure_shape(x, x_spec.shape))

    # Finite inputs of huge magnitude overflow the networks' float32 arithmetic: refused,
    # never answered with NaN or inf.
    def finite(outputs):
        message = "keras_vae: an output is not finite: the input is too large for the model"
        return {
            key: tf.debugging.assert_all_finite(value, message) for key, value in outputs.items()
        }

    @signature(x_spec)
    def serving_default(x, y=None):
        x = checked_x(x)
        params = finite(model.encode_params(x, y=y))
        reconstruction = model.decode(model.posterior.mean(params), x, y=y).mean()
        return finite({"reconstruction": reconstruction, **params})

    @signature(x_spec)
    def encode(x, y=None):
        return finite(model.encode_params(checked_x(x), y=y))

    def decoded(z, noise=None, y=None):
        likelihood = model.decode(z, noise=noise, y=y)
        mean = likelihood.mean()
        outputs = {"mean": mean}
        for key, value in likelihood.distribution.parameters.items():
            if tf.is_tensor(value) or isinstance(value, tf.Variable):
                outputs[key] = tf.broadcast_to(tf.cast(value, tf.float32), tf.shape(mean))
        return outputs

    @signature(z_spec)
    def decode(z, y=None):
        return finite(decoded(tf.ensure_shape(z, z_spec.shape), y=y))

    def per_row(draw, shape, seed, stream):
        """One stateless draw of ``shape`` per row, from (that row's seed, ``stream``)."""
        return tf.map_fn(
            lambda s: draw(shape, seed=tf.stack([s, stream])), seed, fn_output_signature=tf.float32
        )

    def draw_prior(row):
        """z ~ p(z) (p(z|y) for a prior that reads the row's label y) from (seed, 0)."""
        seed, labels = row[0], row[1][None] if len(row) > 1 else None
        return model.sample_prior(1, seed=tf.cast(tf.stack([seed, 0]), tf.int32), labels=labels)[0]

    @signature(seed_spec)
    def sample(seed, y=None):
        rows = (seed, y) if model.prior.reads_condition else (seed,)
        z = tf.map_fn(draw_prior, rows, fn_output_signature=tf.float32)
        noise = None
        if model.autoregressive:
            noise = per_row(tf.random.stateless_uniform, model.data_shape, seed, 1)
        outputs = decoded(z, noise, y)
        return {"z": z, "mean": outputs["mean"]}

    @signature(x_spec)
    def score(x, y=None):
        x = tf.ensure_shape(x, x_spec.shape)
        rows = tf.shape(x)[0]
        # One pass even for an empty batch, so its outputs keep their names and dtypes.
        chunks = tf.maximum((rows + SCORE_CHUNK - 1) // SCORE_CHUNK, 1)
        arrays = {
            key: tf.TensorArray(tf.float32, size=chunks, element_shape=(None,), infer_shape=False)
            for key in ("elbo", "log_px")
        }

        def body(i, arrays):
            rows = slice(i * SCORE_CHUNK, (i + 1) * SCORE_CHUNK)
            scores = model.score(
                x[rows], SCORE_SAMPLES, epsilon=epsilon, y=None if y is None else y[rows]
            )
            return i + 1, {
                key: arrays[key].write(i, tf.cast(scores[key], tf.float32)) for key in arrays
            }

        # parallel_iterations=1: chunks run one after another, else their memory adds up.
        _, arrays = tf.while_loop(
            lambda i, _: i < chunks, body, (tf.constant(0), arrays), parallel_iterations=1
        )
        return finite({key: array.concat() for key, array in arrays.items()})

    return {
        "serving_default": serving_default,
        "encode": encode,
        "decode": decode,
        "sample": sample,
        "score": score,
    }


def _sync_tree(folder):
    """fsync every file under ``folder``, so that a renamed export is complete on disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def next_version(model_dir):
    """1 + the largest integer version folder under ``model_dir`` (1 if none)."""
    versions = [int(p.name) for p in Path(model_dir).glob("*") if p.name.isdigit()]
    return max(versions, default=0) + 1


def _process_may_run(pid):
    """False only where no process with id ``pid`` exists; True for a running process,
    another user's included, and wherever that cannot be told."""
    if pid <= 0:  # os.kill(0, …) would signal our own process group
        return True
    try:
        os.kill(pid, 0)  # signal 0 checks that the process exists and sends nothing
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True
    return True


def remove_stale_temporaries(model_dir):
    """Removes the ``.export-<pid>-*`` folders under ``model_dir`` whose process no longer
    runs, and returns their paths; another running process's folders are left alone."""
    removed = []
    for path in sorted(Path(model_dir).glob(_TEMP_PREFIX + "*")):
        match = _TEMP_NAME.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        if _process_may_run(int(match.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def export_model(model, export_dir, name):
    """Writes ``export_dir/name/<next version>/`` and returns its path.

    The SavedModel is written to a temporary folder beside it, synced and renamed into
    place, so TF Serving (which polls the folder) never sees a half-written version and an
    existing version is never overwritten. ``name`` must pass ``check_model_name`` (nothing
    is written otherwise), and temporary folders left by killed exports are removed first.
    """
    check_model_name(name)
    model_dir = Path(export_dir) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(model_dir)
    archive = keras.export.ExportArchive()
    archive.track(model)
    for signature, fn in serving_functions(model).items():
        archive.add_endpoint(signature, fn)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", dir=model_dir))
    try:
        archive.write_out(str(tmp / "model"), verbose=False)
        extra = tmp / "model" / "assets.extra"
        extra.mkdir()
        (extra / "keras_vae.json").write_text(
            json.dumps(
                {
                    "config": model.get_config(),
                    "score_samples": SCORE_SAMPLES,
                    "signatures": list(SERVING_SIGNATURES),
                },
                indent=2,
            )
        )
        write_warmup_requests(extra / "tf_serving_warmup_requests", model, name)
        _sync_tree(tmp / "model")
        version_dir = model_dir / str(next_version(model_dir))
        if version_dir.exists():
            raise FileExistsError(f"export version folder already exists: {version_dir}")
        os.rename(tmp / "model", version_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_models_config(model_dir, name)
    return version_dir


def write_warmup_requests(path, model, name):
    """TF Serving replays these at load time, so the first real request pays no tracing."""
    from tensorflow_serving.apis import prediction_log_pb2

    from keras_vae.serving import grpc_request

    inputs = {"x": np.zeros((1,) + model.data_shape, "float32")}
    if model.conditional:
        spec = label_spec(model)
        inputs["y"] = np.zeros((1, *spec.shape[1:]), spec.dtype.as_numpy_dtype)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature in ("serving_default", "score"):
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(
                    request=grpc_request(name, signature, inputs)
                )
            )
            writer.write(log.SerializeToString())


def write_models_config(model_dir, name):
    """TF Serving's ``--model_config_file`` for this model, serving the two newest versions
    (so a client pinned to the previous version keeps working during a roll-out)."""
    text = (
        "model_config_list {\n"
        "  config {\n"
        f'    name: "{name}"\n'
        f'    base_path: "/models/{name}"\n'
        '    model_platform: "tensorflow"\n'
        "    model_version_policy { latest { num_versions: 2 } }\n"
        "  }\n"
        "}\n"
    )
    # TF Serving polls this file: it must never see half of it.
    files.write_text(Path(model_dir) / "models.config", text)
