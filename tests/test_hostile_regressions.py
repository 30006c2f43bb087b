"""Hostile-client cases found failing after the step path was rebuilt, kept as tests once fixed: zero-byte
chunks are no progress, restored negative v is refused, whole-tensor steps under one fence apply once, an idle
stream ends with a message naming --stream-idle-seconds."""
import numpy as np
import pytest

from test_hostile import (check_restored_state_refused, check_same_fence_at_once, check_same_fence_while_one_streams,
                          check_stalled_step_stream, idle_server, race_server, stalls, stub)  # noqa: F401 (fixtures)


def test_stream_of_empty_chunks_ends_after_idle_timeout(idle_server, stalls):
    # Only tensor data counts as progress: a stream of zero-byte chunks is ended like a silent one.
    check_stalled_step_stream(idle_server, stalls, "empty chunks")


@pytest.mark.parametrize("how", ["unary", "stream"])
def test_restored_negative_v_is_refused(stub, how):
    # adam's v is a nonnegative slot (Slot.domain): restored state outside it is refused.
    check_restored_state_refused(stub, "v", -1.0, how)


def test_whole_tensor_optimizer_same_fence_while_one_streams_applies_once(race_server, stalls):
    # StepRun.finish re-checks the fence for whole-tensor steps too: the loser is answered as a replay.
    check_same_fence_while_one_streams(race_server, stalls, "normsgd")


def test_whole_tensor_optimizer_same_fence_at_once_applies_once(race_server):
    check_same_fence_at_once(race_server, "normsgd")


def test_idle_ended_stream_says_why(idle_server, stalls):
    # The paced reader ends the call from the handler, so the status carries the reason.
    import grpc
    from optreg.v1 import session_pb2
    from test_hostile import Stalled, create, stub_for
    stub = stub_for(idle_server.address)
    sid = create(stub, {"w": np.ones(4, np.float32)}).session_id
    s = Stalled(stub.StepStream, [session_pb2.StepStreamRequest(session_id=sid, step=0)])
    stalls.append(s)
    err = s.wait_end()
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--stream-idle-seconds" in err.details(), err.details()
