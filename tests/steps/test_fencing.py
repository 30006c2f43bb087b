"""Step numbers fence steps: a repeat is answered again, not applied twice; a gap is refused."""
import grpc
import numpy as np
import pytest

from optreg.client import StepMismatch
from optreg.v1 import session_pb2, session_pb2_grpc, tensors


@pytest.mark.parametrize("reply", ["parameters", "delta", "none"])
def test_duplicate_step_applied_once(server, client, reply):
    params = {"w": np.array([1.0, 2.0, 3.0])}
    s = client.create_session("momentum", params, lr=0.1, step_reply=reply)
    with grpc.insecure_channel(server.address) as ch:
        stub = session_pb2_grpc.SessionServiceStub(ch)
        req = session_pb2.StepRequest(session_id=s.id, step=0, gradients=[tensors.from_numpy("w", np.ones(3))])
        first = stub.Step(req)
        again = stub.Step(req)  # as if the first reply had been lost
        assert (first.step, first.replayed, again.step, again.replayed) == (1, False, 1, True)
        assert [t.data for t in first.tensors] == [t.data for t in again.tensors]
        state = stub.ReadState(session_pb2.ReadStateRequest(session_id=s.id))
        assert state.session.step == 1
        np.testing.assert_allclose(tensors.to_numpy(state.parameters[0]), [0.9, 1.9, 2.9])
        # a gap is refused, naming the server's step
        with pytest.raises(grpc.RpcError) as e:
            stub.Step(session_pb2.StepRequest(session_id=s.id, step=3, gradients=req.gradients))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "at step 1" in e.value.details()
        # an old step (two back) is refused too, not replayed
        stub.Step(session_pb2.StepRequest(session_id=s.id, step=1, gradients=req.gradients))
        with pytest.raises(grpc.RpcError) as e:
            stub.Step(session_pb2.StepRequest(session_id=s.id, step=0, gradients=req.gradients))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_client_reports_server_step(client):
    s = client.create_session("sgd", {"w": np.zeros(2)})
    s.step({"w": np.ones(2)})
    s.step_count = 7
    with pytest.raises(StepMismatch) as e:
        s.step({"w": np.ones(2)})
    assert e.value.server_step == 1
    s.refresh()
    s.step({"w": np.ones(2)})
    assert s.step_count == 2


def test_unfenced_step_when_step_absent(server, client):
    s = client.create_session("sgd", {"w": np.zeros(2)}, lr=1.0)
    with grpc.insecure_channel(server.address) as ch:
        stub = session_pb2_grpc.SessionServiceStub(ch)
        req = session_pb2.StepRequest(session_id=s.id, gradients=[tensors.from_numpy("w", np.ones(2))])
        assert [stub.Step(req).step for _ in range(3)] == [1, 2, 3]
    np.testing.assert_array_equal(s.read_parameters()["w"], [-3.0, -3.0])


class DroppingProxy:
    """A loopback TCP proxy that, once armed, cuts the connection when the server first answers.

    The request reaches the server and is applied, but its reply is lost: the client
    sees UNAVAILABLE, exactly the case fencing exists for.
    """

    def __init__(self, target):
        import socket
        import threading
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.armed = threading.Event()
        self.drops = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(down, up, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, True), daemon=True).start()

    def _pipe(self, src, dst, from_server):
        import socket
        try:
            while data := src.recv(65536):
                if from_server and self.armed.is_set():
                    self.armed.clear()
                    self.drops += 1
                    for s in (src, dst):
                        s.shutdown(socket.SHUT_RDWR)
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def close(self):
        self.listener.close()


def test_retry_after_unavailable_is_applied_once(server):
    from optreg.client import Client
    proxy = DroppingProxy(server.address)
    with Client(proxy.address) as c:
        params = {"w": np.zeros(3)}
        s = c.create_session("sgd", params, lr=1.0)
        proxy.armed.set()
        s.step({"w": np.ones(3)})  # first reply is cut; the client retries the same step
        assert proxy.drops == 1
        assert s.step_count == 1
        np.testing.assert_array_equal(params["w"], [-1.0, -1.0, -1.0])
        np.testing.assert_array_equal(s.read_parameters()["w"], [-1.0, -1.0, -1.0])
    proxy.close()


def test_step_after_a_failed_but_applied_call_does_not_drop_gradients(client):
    p = {"w": np.zeros(2)}
    s = client.create_session("sgd", p, lr=1.0)
    s.step({"w": np.ones(2)})
    s.step_count, p["w"][:] = 0, 0.0  # as if that call had raised after the server applied it
    with pytest.raises(StepMismatch) as e:
        s.step({"w": np.full(2, 5.0)})
    assert "NOT applied" in str(e.value) and e.value.server_step == 1 and s.step_count == 1
    np.testing.assert_array_equal(p["w"], [-1.0, -1.0])  # the applied step's result, not the new one
    s.step({"w": np.full(2, 5.0)})
    np.testing.assert_array_equal(p["w"], [-6.0, -6.0])
