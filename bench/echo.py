"""Baselines for the bench, run in a child process: a gRPC echo of raw bytes and a raw TCP echo.

The gRPC service is a generic handler with no serializers, so a message is the
bytes themselves: the cost of gRPC with no protobuf and no optimizer.
The TCP echo reads a length-prefixed message whole, then writes it back.
"""
from __future__ import annotations

import socket
import struct
import sys
import threading
from concurrent import futures

import grpc

LIMIT = 256 << 20


def _unary(request, context):
    return request


def _stream(request_iterator, context):
    for m in request_iterator:
        yield m


def start_grpc(host="127.0.0.1") -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=[
        ("grpc.max_receive_message_length", LIMIT), ("grpc.max_send_message_length", LIMIT)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.stream_stream_rpc_method_handler(_stream),
    })])
    port = server.add_insecure_port(f"{host}:0")
    server.start()
    return server, port


def _recv_exact(conn, view) -> bool:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _tcp_conn(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(0)
    head = bytearray(8)
    with conn:
        while _recv_exact(conn, memoryview(head)):
            (n,) = struct.unpack("<Q", head)
            if len(buf) < n:
                buf = bytearray(n)
            view = memoryview(buf)[:n]
            if not _recv_exact(conn, view):
                return
            conn.sendall(head)
            conn.sendall(view)


def start_tcp(host="127.0.0.1") -> int:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, 0))
    srv.listen(64)

    def accept():
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=_tcp_conn, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv.getsockname()[1]


class TcpEchoClient:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(0)

    def roundtrip(self, payload) -> None:
        n = len(payload)
        self.sock.sendall(struct.pack("<Q", n))
        self.sock.sendall(payload)
        if len(self.buf) < n + 8:
            self.buf = bytearray(n + 8)
        _recv_exact(self.sock, memoryview(self.buf)[:n + 8])

    def close(self):
        self.sock.close()


def main():
    server, gport = start_grpc()
    tport = start_tcp()
    print(f"echo grpc {gport} tcp {tport}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(0)


if __name__ == "__main__":
    main()
