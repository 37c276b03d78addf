"""The TF Serving clients: cheap to import, exact REST JSON and gRPC conversions."""

import contextlib
import json
import re
import socket
import subprocess
import sys
import textwrap
from concurrent import futures

import numpy as np
import pytest
from helpers import json_server

from keras_vae import serving


def test_import_needs_only_the_standard_library_and_numpy():
    check = textwrap.dedent("""
        import sys
        import keras_vae.serving
        heavy = sorted(m for m in ("tensorflow", "keras", "tensorflow_probability",
                                   "tensorflow_serving", "grpc") if m in sys.modules)
        assert not heavy, f"import keras_vae.serving loaded {heavy}"
    """)
    result = subprocess.run(
        [sys.executable, "-c", check], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_rest_json_round_trip(digits):
    x = digits[:3]
    rows = serving.rest_request("encode", {"x": x})
    assert rows["signature_name"] == "encode" and len(rows["instances"]) == 3
    np.testing.assert_array_equal(np.asarray([r["x"] for r in rows["instances"]], "float32"), x)
    columns = json.loads(json.dumps(serving.rest_request("encode", {"x": x}, row_format=False)))
    np.testing.assert_array_equal(np.asarray(columns["inputs"]["x"], "float32"), x)
    parsed = serving.parse_rest_response(
        {"predictions": [{"z_mean": [1.0, 2.0]}, {"z_mean": [3.0, 4.0]}]}
    )
    np.testing.assert_array_equal(parsed["z_mean"], [[1, 2], [3, 4]])
    parsed = serving.parse_rest_response({"outputs": {"elbo": [-1.5, -2.5]}})
    np.testing.assert_array_equal(parsed["elbo"], [-1.5, -2.5])
    with pytest.raises(ValueError, match="equal batch sizes"):
        serving.rest_request("score", {"x": x, "y": x[:2]})


def test_rest_request_and_response_round_trip_element_by_element():
    rng = np.random.default_rng(0)
    inputs = {
        "x": rng.normal(size=(4, 3, 2, 1)).astype("float32"),
        "seed": np.array([0, 1, -5, 2**40], np.int64),
    }
    # Row format: one dict per example, the i-th row of every input in it.
    rows = json.loads(json.dumps(serving.rest_request("score", inputs)))
    assert set(rows) == {"signature_name", "instances"}
    assert rows["signature_name"] == "score" and len(rows["instances"]) == 4
    for i, instance in enumerate(rows["instances"]):
        assert set(instance) == {"x", "seed"}
        assert instance["seed"] == int(inputs["seed"][i])
        got = np.asarray(instance["x"], "float32")
        assert got.shape == (3, 2, 1)
        for index in np.ndindex(got.shape):
            assert got[index] == inputs["x"][i][index], (i, index)
    # Columnar: every input whole, under "inputs".
    columns = json.loads(json.dumps(serving.rest_request("score", inputs, row_format=False)))
    assert set(columns) == {"signature_name", "inputs"}
    assert columns["inputs"]["seed"] == [0, 1, -5, 2**40]
    got = np.asarray(columns["inputs"]["x"], "float32")
    assert got.shape == inputs["x"].shape
    for index in np.ndindex(got.shape):
        assert got[index] == inputs["x"][index], index
    # Responses in both formats parse back to the same arrays.
    outputs = {"z_mean": inputs["x"][:, :, 0, 0], "log_px": -np.arange(4.0)}
    row_reply = {"predictions": [{k: v[i].tolist() for k, v in outputs.items()} for i in range(4)]}
    column_reply = {"outputs": {k: v.tolist() for k, v in outputs.items()}}
    for reply in (row_reply, column_reply):
        parsed = serving.parse_rest_response(json.loads(json.dumps(reply)))
        assert set(parsed) == set(outputs)
        for name, value in outputs.items():
            assert parsed[name].shape == value.shape
            for index in np.ndindex(value.shape):
                assert parsed[name][index] == value[index], (name, index)
    # A signature with one unnamed output answers with bare lists.
    np.testing.assert_array_equal(
        serving.parse_rest_response({"predictions": [1, 2]})["output"], [1, 2]
    )
    np.testing.assert_array_equal(serving.parse_rest_response({"outputs": [[3]]})["output"], [[3]])


def test_rest_request_names_mismatched_batch_sizes():
    x = np.zeros((3, 2), "float32")
    with pytest.raises(ValueError, match=r"equal batch sizes; got x: 3, y: 2$"):
        serving.rest_request("score", {"x": x, "y": x[:2]})
    # Columnar requests carry each input whole, so sizes need not agree.
    body = serving.rest_request("score", {"x": x, "y": x[:2]}, row_format=False)
    assert (len(body["inputs"]["x"]), len(body["inputs"]["y"])) == (3, 2)


def test_error_response_raises_with_the_servers_message():
    with pytest.raises(ValueError, match="Servable not found"):
        serving.parse_rest_response({"error": "Servable not found for request"})


def test_predict_rest_posts_json_and_parses_the_reply():
    received = {}

    def respond(path, headers, body):
        received.update(path=path, content_type=headers["Content-Type"], body=body)
        return {"outputs": {"elbo": [-1.25, -2.5]}}

    x = np.arange(4, dtype="float32").reshape(2, 2)
    with json_server(respond) as base:
        out = serving.predict_rest(
            f"{base}/v1/models/m/versions/2:predict",
            "score",
            {"x": x},
            row_format=False,
            timeout=20,
        )
    assert received["path"] == "/v1/models/m/versions/2:predict"
    assert received["content_type"] == "application/json"
    assert received["body"] == {"signature_name": "score", "inputs": {"x": [[0, 1], [2, 3]]}}
    np.testing.assert_array_equal(out["elbo"], [-1.25, -2.5])


def test_grpc_request_converts_back_exactly(digits):
    import tensorflow as tf

    seeds = np.array([1, 2, 2**40], np.int64)
    request = serving.grpc_request("vae", "sample", {"seed": seeds}, version=3)
    assert (request.model_spec.name, request.model_spec.signature_name) == ("vae", "sample")
    assert request.model_spec.version.value == 3
    np.testing.assert_array_equal(tf.make_ndarray(request.inputs["seed"]), seeds)
    request = serving.grpc_request("vae", "encode", {"x": digits[:4]})
    got = tf.make_ndarray(request.inputs["x"])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, digits[:4])


def test_predict_grpc_on_loopback():
    """``predict_grpc`` against a stand-in Predict that echoes each input doubled."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    seen = []

    class Echo(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            seen.append(request)
            response = predict_pb2.PredictResponse()
            for key, proto in request.inputs.items():
                response.outputs[f"twice_{key}"].CopyFrom(
                    tf.make_tensor_proto(2 * tf.make_ndarray(proto))
                )
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    x = np.random.default_rng(1).normal(size=(3, 2)).astype("float32")
    seeds = np.array([5, 2**40], np.int64)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            out = serving.predict_grpc(
                channel, "m", "sample", {"x": x, "seed": seeds}, version=4, timeout=20
            )
    finally:
        server.stop(grace=None)
    (request,) = seen
    assert (request.model_spec.name, request.model_spec.signature_name) == ("m", "sample")
    assert request.model_spec.version.value == 4
    assert set(out) == {"twice_x", "twice_seed"}
    assert out["twice_x"].dtype == np.float32 and out["twice_seed"].dtype == np.int64
    np.testing.assert_array_equal(out["twice_x"], 2 * x)
    np.testing.assert_array_equal(out["twice_seed"], 2 * seeds)


def closed_port():
    """A loopback port that nothing listens on: bound, read, and closed again."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def reply_server(status, body, content_type="application/json"):
    """A loopback HTTP server whose every POST gets ``status`` with the bytes ``body``;
    yields its predict URL."""
    with json_server(lambda path, headers, request: (status, body, content_type)) as base:
        yield f"{base}/v1/models/m:predict"


@contextlib.contextmanager
def silent_server():
    """A loopback port that accepts connections (the kernel's backlog) and never replies."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1/models/m:predict"


@contextlib.contextmanager
def refused_url():
    yield f"http://127.0.0.1:{closed_port()}/v1/models/m:predict"


NOT_FOUND = b'{"error": "Servable not found for request: Latest(m)"}'
MULTILINE = json.dumps({"error": "Input to reshape is a tensor with 3 values,\n but 4"}).encode()

# (case, server, the error's class, its whole message with {url} for the URL)
REST_FAILURES = [
    (
        "closed port",
        refused_url,
        serving.ServingUnavailable,
        r"cannot reach TF Serving at {url}: \[Errno \d+\] Connection refused",
    ),
    (
        "no reply in time",
        silent_server,
        serving.ServingUnavailable,
        r"no reply from {url} within 0\.5 s",
    ),
    (
        "HTTP 404 with TF Serving's JSON error",
        lambda: reply_server(404, NOT_FOUND),
        ValueError,
        r"TF Serving at {url} answered HTTP 404: Servable not found for request: Latest\(m\)",
    ),
    (
        "HTTP 400 with a multi-line error",
        lambda: reply_server(400, MULTILINE),
        ValueError,
        (
            r"TF Serving at {url} answered HTTP 400: Input to reshape is a tensor with 3 "
            r"values, but 4"
        ),
    ),
    (
        "HTTP 500 with a plain-text body",
        lambda: reply_server(500, b"upstream\nfailure", "text/plain"),
        ValueError,
        r"TF Serving at {url} answered HTTP 500: upstream failure",
    ),
    (
        "HTTP 503 with no body",
        lambda: reply_server(503, b""),
        ValueError,
        r"TF Serving at {url} answered HTTP 503: Service Unavailable",
    ),
    (
        "a reply that is not JSON",
        lambda: reply_server(200, b"<html>\n<body>proxy login</body></html>", "text/html"),
        ValueError,
        r"the reply from {url} is not JSON: '<html> <body>proxy login</body></html>'",
    ),
    (
        "JSON that is not a predict response",
        lambda: reply_server(200, b"[1, 2]"),
        ValueError,
        r"{url}: not a TF Serving predict response: \[1, 2\]",
    ),
    (
        "a 200 reply carrying an error",
        lambda: reply_server(200, NOT_FOUND),
        ValueError,
        (
            r"{url}: not a TF Serving predict response: Servable not found for request: "
            r"Latest\(m\)"
        ),
    ),
]


@pytest.mark.parametrize(
    "server, error, message",
    [case[1:] for case in REST_FAILURES],
    ids=[c[0] for c in REST_FAILURES],
)
def test_predict_rest_failures_name_the_url_and_the_reason(server, error, message):
    with server() as url, pytest.raises(error) as raised:
        serving.predict_rest(url, "score", {"x": np.zeros((2, 3), "float32")}, timeout=0.5)
    text = str(raised.value)
    assert re.fullmatch(message.format(url=re.escape(url)), text), text
    assert "\n" not in text
    # Unreachable is a ConnectionError (retry later); a refusal is the request's fault.
    assert isinstance(raised.value, ConnectionError) == (error is serving.ServingUnavailable)


SCALARS = [("x", 1.0, "1.0"), ("seed", np.int64(7), "7"), ("x", np.float32(0.5), "0.5")]


@pytest.mark.parametrize("name, value, shown", SCALARS)
def test_scalar_inputs_are_refused_naming_the_input(name, value, shown):
    message = (
        f"input {name!r} is a scalar ({shown}); every input needs a leading batch dimension, "
        f"e.g. [value] for one example"
    )
    batch = np.zeros((2, 3), "float32")
    for make in (
        lambda inputs: serving.rest_request("score", inputs),
        lambda inputs: serving.rest_request("score", inputs, row_format=False),
        lambda inputs: serving.grpc_request("m", "score", inputs),
    ):
        with pytest.raises(ValueError) as raised:
            make({"other": batch, name: value})
        assert str(raised.value) == message
    # predict_rest refuses it before anything is sent: the port is closed.
    url = f"http://127.0.0.1:{closed_port()}/v1/models/m:predict"
    with pytest.raises(ValueError) as raised:
        serving.predict_rest(url, "score", {name: value}, timeout=0.5)
    assert str(raised.value) == message


def test_predict_grpc_failures_name_the_target_model_and_status():
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    class Missing(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            context.abort(grpc.StatusCode.NOT_FOUND, "Servable not found for request:\nLatest(m)")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Missing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    x = {"x": np.zeros((2, 3), "float32")}
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
            pytest.raises(ValueError) as raised,
        ):
            serving.predict_grpc(channel, "m", "score", x, timeout=20)
    finally:
        server.stop(grace=None)
    assert not isinstance(raised.value, ConnectionError)
    assert str(raised.value) == (
        "TF Serving failed Predict for model 'm', signature 'score': NOT_FOUND: Servable not "
        "found for request: Latest(m)"
    )
    assert isinstance(raised.value.__cause__, grpc.RpcError)

    closed = closed_port()
    with (
        grpc.insecure_channel(f"127.0.0.1:{closed}") as channel,
        pytest.raises(serving.ServingUnavailable) as raised,
    ):
        serving.predict_grpc(channel, "m", "score", x, timeout=20)
    assert re.fullmatch(
        rf"TF Serving failed Predict for model 'm', signature 'score': UNAVAILABLE: "
        rf".*{closed}.*",
        str(raised.value),
    ), str(raised.value)
    assert isinstance(raised.value, ConnectionError)
