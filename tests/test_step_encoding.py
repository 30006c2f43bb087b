"""Step's answer is encoded without protobuf on the server (service._step_response) and decoded without
it on the client (tensors.decode_step_response): the bytes are protobuf's, and a real server's answers
decode to what was committed."""
import numpy as np
import pytest

from optreg.server.service import _step_response
from optreg.server.sessions import StepResult
from optreg.v1 import session_pb2, tensors


@pytest.mark.parametrize("step,replayed", [(0, False), (1, True), (2 ** 40, False)])
@pytest.mark.parametrize("arrays", [
    {"w": np.arange(5, dtype=np.float32)},
    {"w": np.ones((3, 4), np.float64), "b": np.zeros(0, np.float32), "s": np.array(2.5, np.float32)},
    {},
])
def test_encoded_step_response_is_protobufs_bytes(step, replayed, arrays):
    result = StepResult(step, replayed, arrays)
    want = session_pb2.StepResponse(step=step, replayed=replayed,
                                    tensors=[tensors.from_numpy(n, a) for n, a in arrays.items()])
    got = _step_response(result)
    assert got == want.SerializeToString()
    back = tensors.decode_step_response(got)
    assert (back.step, back.replayed) == (step, replayed)
    for t in back.chunks:
        np.testing.assert_array_equal(tensors.to_numpy(t), arrays[t.name])


def test_unary_steps_over_a_real_server_match_the_servers_parameters(client):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((4, 5)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    s = client.create_session("adam", {k: v.copy() for k, v in params.items()})
    for _ in range(3):
        r = s.step({k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()})
    server = s.read_parameters()
    assert r.step == 3
    for k in params:
        assert s.arrays[k].shape == params[k].shape
        np.testing.assert_array_equal(s.arrays[k], server[k])
