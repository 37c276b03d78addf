"""Clients for a keras-vae model on TensorFlow Serving: REST JSON and gRPC PredictRequests.

Inputs are dicts of NumPy arrays keyed by the signature's input names (``x``, ``z`` or
``seed``), each with a leading batch dimension; responses come back as dicts of arrays keyed
by output name. See ``saved_models/README.md`` for the server side.

Importing this module needs only the standard library and NumPy: the REST client uses JSON
over ``urllib``; the gRPC functions import TensorFlow and ``tensorflow_serving`` when called.

Errors, each with a one-line message naming the server and its reason or the bad input:

- ``ServingUnavailable`` (a ``ConnectionError``): no answer at all (nothing listening, the
  host unknown, no reply within the timeout; gRPC ``UNAVAILABLE`` or ``DEADLINE_EXCEEDED``);
- ``ValueError``: the server refused the request (an HTTP error status, with the ``error``
  of TF Serving's JSON body; any other gRPC status, with its details), its reply is not a
  predict response, or an input has no leading batch dimension.
"""

import http.client
import json
import urllib.error
import urllib.request

import numpy as np

from keras_vae.files import one_line


class ServingUnavailable(ConnectionError):
    """TF Serving could not be reached, or did not reply in time."""


def _batched(inputs):
    """``inputs`` as arrays by name; raises ValueError naming any scalar among them."""
    arrays = {name: np.asarray(value) for name, value in inputs.items()}
    for name, array in arrays.items():
        if array.ndim == 0:
            raise ValueError(
                f"input {name!r} is a scalar ({one_line(repr(array.item()), 200)}); every input "
                f"needs a leading batch dimension, e.g. [value] for one example"
            )
    return arrays


def rest_request(signature, inputs, row_format=True):
    """The JSON body of ``POST /v1/models/NAME[/versions/N]:predict``.

    Row format: ``{"instances": [{name: row, ...}, ...]}`` (every input shares dimension 0);
    columnar: ``{"inputs": {name: batch, ...}}``. Raises ValueError for a scalar input, and
    in row format for inputs of different batch sizes.
    """
    arrays = _batched(inputs)
    if row_format:
        sizes = {name: a.shape[0] for name, a in arrays.items()}
        if len(set(sizes.values())) != 1:
            got = ", ".join(f"{name}: {size}" for name, size in sizes.items()) or "no inputs"
            raise ValueError(f"row format needs equal batch sizes; got {got}")
        (size,) = set(sizes.values())
        instances = [{name: a[i].tolist() for name, a in arrays.items()} for i in range(size)]
        return {"signature_name": signature, "instances": instances}
    return {"signature_name": signature, "inputs": {name: a.tolist() for name, a in arrays.items()}}


def parse_rest_response(body):
    """Arrays by output name from a REST predict response (row or columnar); raises
    ValueError with the server's ``error`` for anything else."""
    if isinstance(body, dict) and "predictions" in body:
        rows = body["predictions"]
        if rows and isinstance(rows[0], dict):
            return {name: np.asarray([row[name] for row in rows]) for name in rows[0]}
        return {"output": np.asarray(rows)}
    if isinstance(body, dict) and "outputs" in body:
        outputs = body["outputs"]
        if isinstance(outputs, dict):
            return {name: np.asarray(value) for name, value in outputs.items()}
        return {"output": np.asarray(outputs)}
    reason = body["error"] if isinstance(body, dict) and "error" in body else repr(body)
    raise ValueError(f"not a TF Serving predict response: {one_line(reason, 200)}")


def _http_reason(error):
    """The server's reason for an HTTP error: the ``error`` of TF Serving's JSON body, else
    the body itself, else the status line's reason."""
    try:
        body = error.read().decode("utf-8", "replace")
    except OSError:
        body = ""
    try:
        reply = json.loads(body)
    except ValueError:
        reply = None
    if isinstance(reply, dict) and "error" in reply:
        return one_line(reply["error"], 200)
    return one_line(body, 200) or one_line(error.reason, 200)


def predict_rest(url, signature, inputs, row_format=True, timeout=30):
    """POSTs to ``url`` (…/v1/models/NAME:predict) and returns the parsed outputs.

    Raises ServingUnavailable where nothing answers at ``url`` within ``timeout`` seconds,
    and ValueError (naming ``url`` and the server's reason) for an HTTP error or a reply
    that is not a JSON predict response."""
    data = json.dumps(rest_request(signature, inputs, row_format)).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = response.read()
    except urllib.error.HTTPError as error:
        raise ValueError(
            f"TF Serving at {url} answered HTTP {error.code}: {_http_reason(error)}"
        ) from error
    except urllib.error.URLError as error:
        raise ServingUnavailable(
            f"cannot reach TF Serving at {url}: {one_line(error.reason, 200)}"
        ) from error
    except TimeoutError as error:
        raise ServingUnavailable(f"no reply from {url} within {timeout} s") from error
    except (ConnectionError, http.client.HTTPException) as error:
        # The connection was made but broke before a whole reply came back.
        raise ServingUnavailable(
            f"no complete reply from {url}: {one_line(repr(error), 200)}"
        ) from error
    try:
        body = json.loads(reply)
    except ValueError:
        excerpt = one_line(reply.decode("utf-8", "replace"), 200)
        raise ValueError(f"the reply from {url} is not JSON: {excerpt!r}") from None
    try:
        return parse_rest_response(body)
    except ValueError as error:
        raise ValueError(f"{url}: {error}") from None


def grpc_request(model_name, signature, inputs, version=None):
    """A ``PredictRequest`` for ``PredictionService/Predict``; raises ValueError for a scalar
    input."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = int(version)
    for name, value in _batched(inputs).items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def parse_grpc_response(response):
    """Arrays by output name from a ``PredictResponse``."""
    import tensorflow as tf

    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


def predict_grpc(channel, model_name, signature, inputs, version=None, timeout=30):
    """Calls ``Predict`` over a ``grpc.Channel`` (e.g. ``grpc.insecure_channel("host:8500")``).

    A failed call raises ServingUnavailable (status UNAVAILABLE or DEADLINE_EXCEEDED) or
    ValueError (any other status), naming the model, signature and the status's details."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    request = grpc_request(model_name, signature, inputs, version)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        response = stub.Predict(request, timeout=timeout)
    except grpc.RpcError as error:
        code = error.code() if callable(getattr(error, "code", None)) else None
        details = error.details() if callable(getattr(error, "details", None)) else None
        status = getattr(code, "name", "UNKNOWN")
        message = (
            f"TF Serving failed Predict for model "
            f"{model_name!r}, signature {signature!r}: {status}: "
            f"{one_line(details or 'no details', 200)}"
        )
        unavailable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        raise (ServingUnavailable if code in unavailable else ValueError)(message) from error
    return parse_grpc_response(response)
