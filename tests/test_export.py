"""The SavedModel contract: signatures, loading without keras_vae, serving it end to end."""

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from concurrent import futures
from pathlib import Path

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from helpers import json_server, make_vae, posterior_params, rest_stand_in
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from keras_vae import serving
from keras_vae.evaluate import importance_weighted
from keras_vae.export import SCORE_SAMPLES, SERVING_SIGNATURES, export_model, score_epsilon
from keras_vae.likelihoods import GaussianLikelihood


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits):
    keras.utils.set_random_seed(0)
    model = make_vae(
        (8, 8, 1),
        latent_dim=3,
        hidden_units=(32,),
        likelihood="gaussian",
        learn_sigma="shared",
        sigma=0.3,
        seed=0,
    )
    model.compile(optimizer="adam")
    model.fit(digits[:512], epochs=2, batch_size=64, shuffle=False, verbose=0)
    root = tmp_path_factory.mktemp("saved_models")
    return model, export_model(model, root, "digits")


def inputs_for(signature, x, z, seeds):
    return {"decode": {"z": z}, "sample": {"seed": seeds}}.get(signature, {"x": x})


def expected_outputs(model, x, z, seeds):
    """Each signature's outputs computed independently from the in-memory model."""
    z_mean, z_log_var = (t.numpy() for t in posterior_params(model, x))
    decoded = model.decode(z)
    d = model.latent_dim
    sample_z = np.stack([tf.random.stateless_normal((d,), seed=[s, 0]).numpy() for s in seeds])
    score = model.score(x, SCORE_SAMPLES, epsilon=score_epsilon(d))
    if isinstance(model.likelihood, GaussianLikelihood):
        shape = (len(z),) + model.data_shape
        parameters = {
            "loc": decoded.distribution.loc.numpy(),
            "scale": np.broadcast_to(model.likelihood.scale().numpy(), shape),
        }
    else:
        parameters = {"logits": decoded.distribution.logits.numpy()}
    return {
        "serving_default": {
            "reconstruction": model.reconstruct(x).numpy(),
            "z_mean": z_mean,
            "z_log_var": z_log_var,
        },
        "encode": {"z_mean": z_mean, "z_log_var": z_log_var},
        "decode": {"mean": decoded.mean().numpy(), **parameters},
        "sample": {"z": sample_z, "mean": model.decode(sample_z).mean().numpy()},
        "score": {key: value.numpy() for key, value in score.items()},
    }


def saved_model_cli():
    """The ``saved_model_cli`` of the running interpreter's environment (activated or not)."""
    beside = Path(sys.executable).parent / "saved_model_cli"
    if beside.exists():
        return str(beside)
    found = shutil.which("saved_model_cli")
    if found is None:
        pytest.fail(
            f"saved_model_cli is neither at {beside} nor on PATH; it comes with the "
            f"tensorflow package",
            pytrace=False,
        )
    return found


def test_saved_model_cli_lists_every_signature(exported):
    _, path = exported
    shown = subprocess.run(
        [saved_model_cli(), "show", "--all", "--dir", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for signature, inputs, outputs in [
        ("serving_default", ["x"], ["reconstruction", "z_mean", "z_log_var"]),
        ("encode", ["x"], ["z_mean", "z_log_var"]),
        ("decode", ["z"], ["mean", "loc", "scale"]),
        ("sample", ["seed"], ["z", "mean"]),
        ("score", ["x"], ["elbo", "log_px"]),
    ]:
        block = shown.split(f"signature_def['{signature}']:")[1].split("signature_def[")[0]
        assert "Method name is: tensorflow/serving/predict" in block
        for name in inputs + outputs:
            assert f"['{name}'] tensor_info:" in block, (signature, name)
        assert "DT_HALF" not in block and "DT_BFLOAT16" not in block
        assert "DT_INVALID" not in block
    assert "shape: (-1, 8, 8, 1)" in shown and "shape: (-1, 3)" in shown
    assert "dtype: DT_INT64" in shown.split("signature_def['sample']:")[1]


LOADER = textwrap.dedent("""
    import sys
    # keras_vae, Keras and TFP must not be needed to serve the model.
    sys.modules["keras"] = sys.modules["keras_vae"] = None
    sys.modules["tensorflow_probability"] = None
    import json, numpy as np, tensorflow as tf
    loaded = tf.saved_model.load(sys.argv[1])
    inputs = np.load(sys.argv[2])
    out = {}
    for name, fn in loaded.signatures.items():
        arg = {"decode": "z", "sample": "seed"}.get(name, "x")
        for key, value in fn(**{arg: tf.constant(inputs[arg])}).items():
            out[f"{name}/{key}"] = value.numpy()
    np.savez(sys.argv[3], **out)
""")


def test_loads_without_keras_vae_and_reproduces_the_model(exported, digits, tmp_path):
    model, path = exported
    x, z = digits[:5], np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    seeds = np.array([3, 7, 3, 11, 0], np.int64)
    np.savez(tmp_path / "in.npz", x=x, z=z, seed=seeds)
    subprocess.run(
        [
            sys.executable,
            "-c",
            LOADER,
            str(path),
            str(tmp_path / "in.npz"),
            str(tmp_path / "out.npz"),
        ],
        check=True,
        capture_output=True,
    )
    got = np.load(tmp_path / "out.npz")
    expected = expected_outputs(model, x, z, seeds)
    assert {key.split("/")[0] for key in got.files} == set(SERVING_SIGNATURES)
    for signature, outputs in expected.items():
        assert {k.split("/")[1] for k in got.files if k.startswith(signature + "/")} == set(outputs)
        for key, value in outputs.items():
            np.testing.assert_allclose(
                got[f"{signature}/{key}"], value, rtol=1e-5, atol=1e-5, err_msg=f"{signature}/{key}"
            )
    # A seed gives the same row wherever it stands in the batch; other seeds differ.
    np.testing.assert_array_equal(got["sample/z"][0], got["sample/z"][2])
    assert not np.allclose(got["sample/z"][0], got["sample/z"][1])


def test_tfsmlayer_and_reproducibility(exported, digits):
    model, path = exported
    layer = keras.layers.TFSMLayer(str(path), call_endpoint="encode")
    out = layer(digits[:4])
    np.testing.assert_allclose(out["z_mean"], model.encode_params(digits[:4])["z_mean"], atol=1e-5)
    score = tf.saved_model.load(str(path)).signatures["score"]
    first = score(x=tf.constant(digits[:6]))
    np.testing.assert_array_equal(first["log_px"], score(x=tf.constant(digits[:6]))["log_px"])
    # Each row's score depends on that row alone.
    np.testing.assert_allclose(
        score(x=tf.constant(digits[2:3]))["log_px"], first["log_px"][2:3], rtol=1e-5
    )


def test_score_agrees_with_the_evaluation_module(exported, digits):
    model, path = exported
    x = digits[:40]
    served = tf.saved_model.load(str(path)).signatures["score"](x=tf.constant(x))
    reference = importance_weighted(model, x, 16 * SCORE_SAMPLES, seed=9)
    # The served scores use K = 256 draws shared by all rows, so their errors are correlated
    # across examples: compare each example with a 16× more precise reference, within 4 of
    # the served estimate's own standard errors (the reference's, scaled to K = 256).
    scale = np.sqrt(16)
    for key, slack in (("elbo", 0.0), ("log_px", 0.1)):  # log p̂_K is biased low by O(1/K)
        served_se = scale * reference[f"{key}_se"]
        diff = served[key].numpy() - reference[key]
        assert np.all(np.abs(diff) < 4 * served_se + slack), (key, np.abs(diff / served_se).max())


def test_bad_inputs_are_refused(exported, digits):
    _, path = exported
    signatures = tf.saved_model.load(str(path)).signatures
    shape_error = r"Shape of tensor \w+ \[2,(64|4)\] is not compatible with expected shape"
    with pytest.raises(tf.errors.InvalidArgumentError, match=shape_error):
        signatures["encode"](x=tf.zeros((2, 64)))
    with pytest.raises(tf.errors.InvalidArgumentError, match=shape_error):
        signatures["score"](x=tf.zeros((2, 64)))
    with pytest.raises(tf.errors.InvalidArgumentError, match=shape_error):
        signatures["decode"](z=tf.zeros((2, 4)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a float tensor"):
        signatures["encode"](x=tf.zeros((2, 8, 8, 1), tf.int32))
    bad = digits[:2].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or inf"):
        signatures["serving_default"](x=tf.constant(bad))


@pytest.mark.parametrize("value", [1e10, 1e20, 3e38])
def test_inputs_that_overflow_the_score_are_refused_not_answered_with_nan(exported, value):
    model, path = exported
    signatures = tf.saved_model.load(str(path)).signatures
    x = np.full((2, 8, 8, 1), value, "float32")
    message = "the score is not finite: x is too large"
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        signatures["score"](x=tf.constant(x))
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        model.score(x, 8)
    with pytest.raises(ValueError, match=r"scores of 2 examples are not finite .*example 0"):
        importance_weighted(model, x, 4)
    for name in ("serving_default", "encode"):
        finite_or_refused(signatures[name], x=tf.constant(x))
    # Ordinary inputs still score, served and in memory alike.
    fine = signatures["score"](x=tf.constant(x / value))
    assert np.isfinite(fine["log_px"].numpy()).all()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_decode_refuses_z_that_is_not_finite(exported, value):
    model, path = exported
    signatures = tf.saved_model.load(str(path)).signatures
    z = np.zeros((2, 3), "float32")
    z[1, 2] = value
    with pytest.raises(tf.errors.InvalidArgumentError, match="z contains NaN or inf"):
        signatures["decode"](z=tf.constant(z))
    with pytest.raises(tf.errors.InvalidArgumentError, match="z contains NaN or inf"):
        model.decode(z)
    for huge in (1e10, 3e38, -3e38):  # finite z far out: a finite answer or a refusal
        finite_or_refused(signatures["decode"], z=tf.constant(np.full((2, 3), huge, "float32")))


def finite_or_refused(signature, **inputs):
    """ "finite" if every output of the call is finite, "refused" if it raised the overflow
    error; anything else (a NaN or inf answer) fails."""
    try:
        outputs = signature(**inputs)
    except tf.errors.InvalidArgumentError as error:
        assert "the input is too large for the model" in str(error)
        return "refused"
    for key, value in outputs.items():
        assert np.isfinite(value.numpy()).all(), key
    return "finite"


def _tree_digest(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_second_export_is_version_2_and_leaves_version_1(exported):
    model, path = exported
    before = _tree_digest(path)
    second = export_model(model, path.parent.parent, "digits")
    assert (path.name, second.name) == ("1", "2")
    assert _tree_digest(path) == before
    config = text_format.Parse(
        (path.parent / "models.config").read_text(), model_server_config_pb2.ModelServerConfig()
    )
    (entry,) = config.model_config_list.config
    assert (entry.name, entry.base_path) == ("digits", "/models/digits")
    assert entry.model_version_policy.latest.num_versions == 2


def test_failed_export_leaves_nothing(exported, monkeypatch, tmp_path):
    model, _ = exported

    def broken(*args, **kwargs):  # fails after the SavedModel itself is written
        raise OSError("disk full")

    monkeypatch.setattr("keras_vae.export.write_warmup_requests", broken)
    with pytest.raises(OSError, match="disk full"):
        export_model(model, tmp_path, "m")
    assert [p.name for p in (tmp_path / "m").iterdir()] == []


def test_export_has_no_device_placement_or_xla_and_ships_warmup_requests(exported):
    from tensorflow.core.protobuf import saved_model_pb2

    _, path = exported
    graph = (path / "saved_model.pb").read_bytes()
    assert b"_XlaMustCompile" not in graph
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString(graph)
    pinned = {
        f.signature.name
        for f in saved.meta_graphs[0].graph_def.library.function
        if any(node.device for node in f.node_def)
    }
    # Only checkpoint save/restore is pinned to the CPU; compute goes wherever it is served.
    assert pinned and all("_traced_save_" in n or "_traced_restore_" in n for n in pinned)
    records = list(
        tf.data.TFRecordDataset(str(path / "assets.extra" / "tf_serving_warmup_requests"))
    )
    assert len(records) == 2
    meta = json.loads((path / "assets.extra" / "keras_vae.json").read_text())
    assert meta["score_samples"] == SCORE_SAMPLES


class SavedModelServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """A stand-in for TF Serving's Predict: runs the requested signature of a SavedModel."""

    def __init__(self, path):
        self.signatures = tf.saved_model.load(str(path)).signatures

    def Predict(self, request, context):
        fn = self.signatures[request.model_spec.signature_name or "serving_default"]
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(request.model_spec)
        for key, value in fn(**inputs).items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
        return response


def test_grpc_client_end_to_end_on_loopback(exported, digits):
    model, path = exported
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        SavedModelServicer(path), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            out = serving.predict_grpc(channel, "digits", "encode", {"x": digits[:4]}, timeout=20)
    finally:
        server.stop(grace=None)
    np.testing.assert_allclose(out["z_mean"], model.encode_params(digits[:4])["z_mean"], atol=1e-5)


def test_rest_client_end_to_end_on_loopback(exported, digits):
    """``predict_rest`` against a stand-in for TF Serving's REST predict API."""
    model, path = exported
    signatures = tf.saved_model.load(str(path)).signatures
    with json_server(rest_stand_in(signatures)) as base:
        url = f"{base}/v1/models/digits:predict"
        rows = serving.predict_rest(url, "encode", {"x": digits[:3]}, timeout=20)
        columns = serving.predict_rest(
            url, "score", {"x": digits[:3]}, row_format=False, timeout=20
        )
    np.testing.assert_allclose(rows["z_mean"], model.encode_params(digits[:3])["z_mean"], atol=1e-5)
    expected = signatures["score"](x=tf.constant(digits[:3]))
    np.testing.assert_allclose(columns["log_px"], expected["log_px"].numpy(), rtol=1e-6)
