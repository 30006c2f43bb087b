"""Generic-tool discovery: a client that knows nothing of optreg's generated code.

Everything here comes from the server at run time through gRPC server
reflection: the service and method names, the message descriptors, the enum
values. Request messages are built from those descriptors, sent with
channel.unary_unary on the descriptors' method paths, and the step's result is
checked against SGD's formula, p - lr * g. Nothing from optreg is imported.
"""
from __future__ import annotations

import struct

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

SESSION_SERVICE = "optreg.v1.SessionService"
REGISTRY_SERVICE = "optreg.v1.OptimizerRegistryService"


class Reflected:
    """Services and messages of one server, as reflection describes them."""

    def __init__(self, channel: grpc.Channel):
        self.channel = channel
        self.database = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.database)

    def services(self) -> list[str]:
        return list(self.database.get_services())

    def method(self, service: str, name: str):
        """A callable for service/name, with serializers from the reflected descriptors; and the request class."""
        method = self.pool.FindServiceByName(service).FindMethodByName(name)
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        path = f"/{method.containing_service.full_name}/{method.name}"
        call = self.channel.unary_unary(path, request_serializer=request_cls.SerializeToString,
                                        response_deserializer=response_cls.FromString)
        return call, request_cls

    def enum_value(self, enum: str, name: str) -> int:
        return self.pool.FindEnumTypeByName(enum).values_by_name[name].number


@pytest.fixture
def reflected(server):
    with grpc.insecure_channel(server.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield Reflected(channel)


def _float64_tensor(tensor, name, shape, values, dtype_code):
    tensor.name = name
    tensor.dtype = dtype_code
    tensor.shape.extend(shape)
    tensor.data = struct.pack(f"<{len(values)}d", *values)


def _float64_values(tensor) -> list[float]:
    data = tensor.data
    return list(struct.unpack(f"<{len(data) // 8}d", data))


def test_reflection_lists_the_services(reflected):
    services = reflected.services()
    assert SESSION_SERVICE in services
    assert REGISTRY_SERVICE in services
    session = reflected.pool.FindServiceByName(SESSION_SERVICE)
    assert {"CreateSession", "Step", "ReadParameters", "DeleteSession"} <= set(session.methods_by_name)


def test_create_and_step_through_reflection(reflected):
    list_optimizers, list_request = reflected.method(REGISTRY_SERVICE, "ListOptimizers")
    listing = list_optimizers(list_request(), timeout=30)
    sgd = {o.name: o for o in listing.optimizers}.get("sgd")
    assert sgd is not None, [o.name for o in listing.optimizers]
    assert "lr" in {h.name for h in sgd.hyperparameters}

    float64 = reflected.enum_value("optreg.v1.DataType", "DATA_TYPE_FLOAT64")
    reply_parameters = reflected.enum_value("optreg.v1.StepReply", "STEP_REPLY_PARAMETERS")
    lr = 0.25
    w0 = [1.0, -2.0, 3.5, 0.125, -0.5, 7.0]
    b0 = [0.5, -0.25]

    create, create_request = reflected.method(SESSION_SERVICE, "CreateSession")
    request = create_request()
    request.config.optimizer = "sgd"
    request.config.hyperparameters["lr"] = lr
    request.config.master_dtype = float64
    request.config.step_reply = reply_parameters
    _float64_tensor(request.parameters.add(), "W", [2, 3], w0, float64)
    _float64_tensor(request.parameters.add(), "b", [2], b0, float64)
    session = create(request, timeout=30).session
    assert session.session_id
    assert session.optimizer == "sgd"
    assert session.step == 0
    assert session.hyperparameters["lr"] == lr
    assert {p.name: list(p.shape) for p in session.parameters} == {"W": [2, 3], "b": [2]}

    step, step_request = reflected.method(SESSION_SERVICE, "Step")
    expected = {"W": list(w0), "b": list(b0)}
    try:
        for t in range(3):
            grads = {"W": [0.5 * (i + 1) * (-1) ** (i + t) for i in range(6)], "b": [2.0 - t, -0.75 * t]}
            request = step_request()
            request.session_id = session.session_id
            request.step = t
            _float64_tensor(request.gradients.add(), "W", [2, 3], grads["W"], float64)
            _float64_tensor(request.gradients.add(), "b", [2], grads["b"], float64)
            reply = step(request, timeout=30)
            assert reply.step == t + 1
            assert not reply.replayed
            for name in expected:
                expected[name] = [p - lr * g for p, g in zip(expected[name], grads[name])]
            got = {tensor.name: _float64_values(tensor) for tensor in reply.tensors}
            assert set(got) == {"W", "b"}
            for name in expected:
                assert got[name] == pytest.approx(expected[name], rel=1e-15, abs=1e-15), (t, name)

        # A stale step number is refused: the contract's fencing, seen through reflection too.
        request = step_request()
        request.session_id = session.session_id
        request.step = 0
        _float64_tensor(request.gradients.add(), "W", [2, 3], [0.0] * 6, float64)
        _float64_tensor(request.gradients.add(), "b", [2], [0.0] * 2, float64)
        with pytest.raises(grpc.RpcError) as refused:
            step(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        delete, delete_request = reflected.method(SESSION_SERVICE, "DeleteSession")
        delete(delete_request(session_id=session.session_id), timeout=30)

    get, get_request = reflected.method(SESSION_SERVICE, "GetSession")
    with pytest.raises(grpc.RpcError) as gone:
        get(get_request(session_id=session.session_id), timeout=30)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
