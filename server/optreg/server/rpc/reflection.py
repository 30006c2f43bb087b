"""Server reflection that resolves every symbol and carries the .proto comments.

grpcio-reflection answers from the process's descriptor pool, which falls short
twice (grpc_reflection/v1alpha/_base.py):
- `_file_containing_symbol` calls `DescriptorPool.FindFileContainingSymbol`,
  and the upb pool that protobuf uses finds messages, fields, enums and services
  there but not methods: `grpcurl describe optreg.v1.SessionService.Step` got
  NOT_FOUND ("Symbol not found");
- `_file_descriptor_response` serializes each file with `CopyToProto`, which
  leaves out `source_code_info`, so no comment reached a client.

So optreg's own files are served from proto/optreg/v1/descriptors.binpb, a
FileDescriptorSet that proto/generate.py writes with protoc's
--include_source_info --include_imports (tests/proto/test_generated.py fails when it
is stale), with a symbol index built from it that includes methods, fields,
enum values and nested types. Everything else (health, reflection itself) still
comes from the pool, through the base class.
"""
from __future__ import annotations

import pathlib

from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from optreg.v1 import session_pb2

DESCRIPTOR_SET = pathlib.Path(session_pb2.__file__).with_name("descriptors.binpb")


def _index_messages(prefix: str, messages, add) -> None:
    for m in messages:
        name = f"{prefix}.{m.name}"
        add(name)
        for f in (*m.field, *m.extension):
            add(f"{name}.{f.name}")
        for o in m.oneof_decl:
            add(f"{name}.{o.name}")
        _index_enums(name, m.enum_type, add)
        _index_messages(name, m.nested_type, add)


def _index_enums(prefix: str, enums, add) -> None:
    for e in enums:
        add(f"{prefix}.{e.name}")
        for v in e.value:  # enum values are scoped beside their enum, as in C++
            add(f"{prefix}.{v.name}")
            add(f"{prefix}.{e.name}.{v.name}")


def index(files: list[descriptor_pb2.FileDescriptorProto]) -> dict[str, str]:
    """Every fully qualified symbol the files define -> the defining file's name."""
    symbols: dict[str, str] = {}
    for f in files:
        def add(name, _file=f.name):
            symbols[name.lstrip(".")] = _file
        prefix = f".{f.package}" if f.package else ""
        _index_messages(prefix, f.message_type, add)
        _index_enums(prefix, f.enum_type, add)
        for ext in f.extension:
            add(f"{prefix}.{ext.name}")
        for s in f.service:
            add(f"{prefix}.{s.name}")
            for m in s.method:
                add(f"{prefix}.{s.name}.{m.name}")
    return symbols


class Reflection(reflection.ReflectionServicer):
    """grpcio-reflection's servicer, answering for optreg's files from the descriptor set."""

    def __init__(self, service_names, descriptor_set: bytes):
        super().__init__(service_names)
        fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
        self._protos = {f.name: f for f in fds.file}
        self._bytes = {f.name: f.SerializeToString() for f in fds.file}
        self._symbols = index(list(fds.file))

    def _response(self, request, name: str):
        files, todo = [], [name]
        while todo:  # the file and its imports, each once (grpcurl asks for any it lacks by name)
            n = todo.pop()
            if n in files:
                continue
            files.append(n)
            todo.extend(d for d in self._protos[n].dependency if d in self._protos)
        return reflection_pb2.ServerReflectionResponse(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=[self._bytes[n] for n in files]),
            original_request=request)

    def _file_by_filename(self, request, filename):
        if filename in self._protos:
            return self._response(request, filename)
        return super()._file_by_filename(request, filename)

    def _file_containing_symbol(self, request, fully_qualified_name):
        name = self._symbols.get(fully_qualified_name.lstrip("."))
        if name is not None:
            return self._response(request, name)
        return super()._file_containing_symbol(request, fully_qualified_name)


def enable_reflection(service_names, server) -> None:
    """Add the reflection service to `server` (a grpc.Server), listing `service_names`."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        Reflection(service_names, DESCRIPTOR_SET.read_bytes()), server)
