"""Clients for a keras-vae model on TensorFlow Serving: REST JSON and gRPC PredictRequests.

Inputs are dicts of NumPy arrays keyed by the signature's input names (``x``, ``z`` or
``seed``), each with a leading batch dimension; responses come back as dicts of arrays keyed
by output name. See ``saved_models/README.md`` for the server side.

Importing this module needs only the standard library and NumPy: the REST client uses JSON
over ``urllib``; the gRPC functions import TensorFlow and ``tensorflow_serving`` when called.
"""

import json
import urllib.request

import numpy as np


def rest_request(signature, inputs, row_format=True):
    """The JSON body of ``POST /v1/models/NAME[/versions/N]:predict``.

    Row format: ``{"instances": [{name: row, ...}, ...]}`` (every input shares dimension 0);
    columnar: ``{"inputs": {name: batch, ...}}``.
    """
    arrays = {name: np.asarray(value) for name, value in inputs.items()}
    if row_format:
        sizes = {name: a.shape[0] if a.ndim else None for name, a in arrays.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            got = (
                ", ".join(
                    f"{name}: {'scalar' if size is None else size}" for name, size in sizes.items()
                )
                or "no inputs"
            )
            raise ValueError(f"row format needs equal batch sizes; got {got}")
        (size,) = set(sizes.values())
        instances = [{name: a[i].tolist() for name, a in arrays.items()} for i in range(size)]
        return {"signature_name": signature, "instances": instances}
    return {"signature_name": signature, "inputs": {name: a.tolist() for name, a in arrays.items()}}


def parse_rest_response(body):
    """Arrays by output name from a REST predict response (row or columnar)."""
    if "predictions" in body:
        rows = body["predictions"]
        if rows and isinstance(rows[0], dict):
            return {name: np.asarray([row[name] for row in rows]) for name in rows[0]}
        return {"output": np.asarray(rows)}
    if "outputs" in body:
        outputs = body["outputs"]
        if isinstance(outputs, dict):
            return {name: np.asarray(value) for name, value in outputs.items()}
        return {"output": np.asarray(outputs)}
    raise ValueError(f"not a TF Serving predict response: {body.get('error', body)}")


def predict_rest(url, signature, inputs, row_format=True, timeout=30):
    """POSTs to ``url`` (…/v1/models/NAME:predict) and returns the parsed outputs."""
    data = json.dumps(rest_request(signature, inputs, row_format)).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return parse_rest_response(json.loads(response.read()))


def grpc_request(model_name, signature, inputs, version=None):
    """A ``PredictRequest`` for ``PredictionService/Predict``."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = int(version)
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(np.asarray(value)))
    return request


def parse_grpc_response(response):
    """Arrays by output name from a ``PredictResponse``."""
    import tensorflow as tf

    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


def predict_grpc(channel, model_name, signature, inputs, version=None, timeout=30):
    """Calls ``Predict`` over a ``grpc.Channel`` (e.g. ``grpc.insecure_channel("host:8500")``)."""
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response = stub.Predict(grpc_request(model_name, signature, inputs, version), timeout=timeout)
    return parse_grpc_response(response)
