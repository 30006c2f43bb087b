"""ListSessions pages: page_size and page_token, in session id order; tokens the server signed."""
from __future__ import annotations

import base64
import json

import grpc
import numpy as np
import pytest

from cli_helpers import optreg
from durability_helpers import stub
from optreg.client import Client
from optreg.v1 import session_pb2, tensors

T = 30


def _create(st, sid, metadata=()):
    config = session_pb2.SessionConfig(optimizer="sgd", session_id=sid)
    st.CreateSession(session_pb2.CreateSessionRequest(
        config=config, parameters=[tensors.from_numpy("w", np.ones(2, np.float32))]), timeout=T, metadata=metadata)


def _page(st, size, token="", metadata=()):
    r = st.ListSessions(session_pb2.ListSessionsRequest(page_size=size, page_token=token), timeout=T,
                        metadata=metadata)
    return [s.session_id for s in r.sessions], r.next_page_token


def _refused(call, field):
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert field in e.value.details()


@pytest.fixture
def filled(start_server):
    s = start_server("--memory-only")
    ch, st = stub(s.address)
    ids = [f"run-{i:04d}" for i in range(0, 500, 2)]  # 250, even numbers: room for new ids between them
    for sid in reversed(ids):  # (created out of order: the pages are in id order all the same)
        _create(st, sid)
    yield s, st, ids
    ch.close()


def test_pages_list_every_session_once_in_id_order(filled):
    s, st, ids = filled
    got, token, sizes = [], "", []
    while True:
        page, token = _page(st, 100, token)
        got += page
        sizes.append(len(page))
        if not token:
            break
    assert got == ids
    assert sizes == [100, 100, 50]
    # 0: everything in one reply, as before paging
    assert _page(st, 0) == (ids, "")
    with Client(s.address) as c:
        assert [i.session_id for i in c.list_sessions()] == ids
        assert [i.session_id for i in c.iter_sessions(page_size=7)] == ids


def test_sessions_created_or_deleted_between_pages_skip_and_repeat_nothing(filled):
    s, st, ids = filled
    first, token = _page(st, 100)
    assert first == ids[:100]
    cursor = first[-1]
    st.DeleteSession(session_pb2.DeleteSessionRequest(session_id=cursor), timeout=T)  # the page's last
    st.DeleteSession(session_pb2.DeleteSessionRequest(session_id=ids[150]), timeout=T)  # one still to come
    _create(st, "run-0001")  # sorts before the cursor: not on later pages
    _create(st, "run-0301")  # after it: listed once
    rest = []
    while token:
        page, token = _page(st, 100, token)
        rest += page
    expected = sorted(set(ids[100:]) - {ids[150]} | {"run-0301"})
    assert rest == expected


def test_bad_page_tokens_and_sizes_are_invalid_argument(filled, start_server):
    s, st, ids = filled
    _, token = _page(st, 10)
    assert token
    for bad in ("garbage", "!!", token[:-3], token + "A", "A" * 200):
        _refused(lambda: _page(st, 10, bad), "page_token")
    # The id inside is not the client's to change: the same token, naming another id, is refused.
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    forged = base64.urlsafe_b64encode(raw.replace(ids[9].encode(), ids[100].encode())).decode().rstrip("=")
    assert forged != token
    _refused(lambda: _page(st, 10, forged), "page_token")
    # Another server's (or this one's before a restart)
    other = start_server("--memory-only")
    ch, st2 = stub(other.address)
    _create(st2, ids[0])
    _refused(lambda: _page(st2, 10, token), "page_token")
    ch.close()
    for size in (-1, 1001):
        _refused(lambda: _page(st, size), "page_size")
    assert _page(st, 10, token)[0] == ids[10:20]  # the server keeps serving, and the good token still works


def test_a_token_is_only_its_callers(start_server, tmp_path):
    path = tmp_path / "tokens"
    path.write_text("alice-token\nbob-token\n")
    s = start_server("--memory-only", "--token-file", str(path))
    ch, st = stub(s.address)
    alice, bob = [("authorization", "Bearer alice-token")], [("authorization", "Bearer bob-token")]
    for i in range(5):
        _create(st, f"a{i}", alice)
        _create(st, f"b{i}", bob)
    page, token = _page(st, 2, metadata=alice)
    assert page == ["a0", "a1"] and token
    _refused(lambda: _page(st, 2, token, metadata=bob), "page_token")
    assert _page(st, 2, token, metadata=alice)[0] == ["a2", "a3"]
    assert _page(st, 10, metadata=bob) == ([f"b{i}" for i in range(5)], "")
    ch.close()


def test_the_cli_lists_every_page(filled):
    s, st, ids = filled
    listed = optreg("sessions", "list", "--address", s.address, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [i["session_id"] for i in json.loads(listed.stdout)] == ids  # 250: three of the client's pages


def test_an_idle_sessions_listing_follows_its_changes(start_server, tmp_path):
    """An idle session's listed entry is kept encoded (service.listed_info): each change, made while it is
    idle or after it loads again, shows in the next listing as in GetSession."""
    import time
    s = start_server("--data-dir", str(tmp_path), "--idle-seconds", "0.2")

    def listed(c, sid):
        return next(i for i in c.list_sessions() if i.session_id == sid)

    def idle(c, sid):
        for _ in range(200):
            if not c.get_session(sid).loaded:
                return
            time.sleep(0.05)
        raise AssertionError(f"{sid} was not unloaded")

    with Client(s.address) as c:
        sess = c.create_session("adam", {"w": np.ones(4, np.float32)}, lr=0.01, session_id="quiet")
        c.create_session("sgd", {"w": np.ones(2, np.float32)}, session_id="other", durability="none")
        sess.step({"w": np.full(4, 0.5, np.float32)})
        idle(c, "quiet")
        first = listed(c, "quiet")
        assert (first.step, first.loaded, first.hyperparameters["lr"]) == (1, False, pytest.approx(0.01))
        assert listed(c, "quiet") == first  # (kept)
        sess.set_hyperparameters(lr=0.02)
        idle(c, "quiet")
        after_hp = listed(c, "quiet")
        assert after_hp.hyperparameters["lr"] == pytest.approx(0.02) and after_hp == c.get_session("quiet")
        sess.step({"w": np.full(4, 0.5, np.float32)})
        assert listed(c, "quiet").step == 2 and listed(c, "quiet").loaded
        idle(c, "quiet")
        again = listed(c, "quiet")
        assert again.step == 2 and not again.loaded and again == c.get_session("quiet")
        assert again.last_used_at >= after_hp.last_used_at


def test_a_loaded_sessions_listing_follows_its_steps(start_server):
    """A loaded single-writer session's listed entry is kept encoded too (service.listed_info): each step
    and hyperparameter change shows in the next listing, as in GetSession."""
    s = start_server("--memory-only")

    def listed(c):
        return next(i for i in c.list_sessions() if i.session_id == "busy")

    with Client(s.address) as c:
        sess = c.create_session("adam", {"w": np.ones(4, np.float32)}, lr=0.01, session_id="busy")
        first = listed(c)
        assert first.loaded and first.step == 0 and listed(c) == first == c.get_session("busy")
        for k in (1, 2):
            sess.step({"w": np.full(4, 0.5, np.float32)})
            assert listed(c).step == k and listed(c) == c.get_session("busy")
        sess.set_hyperparameters(lr=0.02)
        assert listed(c).hyperparameters["lr"] == pytest.approx(0.02) and listed(c) == c.get_session("busy")
