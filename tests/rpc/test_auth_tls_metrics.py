"""Tokens, TLS, the non-loopback guard and the metrics endpoint, end to end."""
from __future__ import annotations

import datetime
import ipaddress
import re
import socket
import urllib.request

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import ServerProcess
from optreg.client import Client, RetryPolicy
from optreg.client.errors import OptregError


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("alice-token\nbob-token\n")
    return str(path)


def test_token_isolation(start_server, tokens, tmp_path):
    s = start_server("--data-dir", str(tmp_path / "d"), "--token-file", tokens)
    with Client(s.address, token="alice-token") as alice, Client(s.address, token="bob-token") as bob:
        a = alice.create_session("sgd", {"W": np.ones(3)}, session_id="alice-run")
        a.step({"W": np.ones(3)})
        for call in (lambda: bob.get_session("alice-run"), lambda: bob.session("alice-run", {}).read_state(),
                     lambda: bob.session("alice-run", {}).step({"W": np.ones(3)}),
                     lambda: bob.delete_session("alice-run")):
            with pytest.raises(OptregError) as foreign:
                call()
            assert foreign.value.code == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(OptregError) as missing:
            bob.get_session("no-such-run")
        # The same answer as for a session that does not exist: nothing reveals alice's.
        assert missing.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert foreign.value.details.replace("alice-run", "X") == missing.value.details.replace("no-such-run", "X")
        with pytest.raises(OptregError) as taken:
            bob.create_session("sgd", {"W": np.ones(3)}, session_id="alice-run")
        assert taken.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert [i.session_id for i in bob.list_sessions()] == []
        assert [i.session_id for i in alice.list_sessions()] == ["alice-run"]
        assert alice.get_session("alice-run").step == 1
    for token in (None, "mallory"):
        with Client(s.address, token=token) as anon:
            with pytest.raises(OptregError) as e:
                anon.list_sessions()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(OptregError) as e:
                anon.optimizers()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    # Ownership survives a restart (the owner's token hash is in the file).
    s.stop()
    s2 = start_server("--data-dir", str(tmp_path / "d"), "--token-file", tokens)
    with Client(s2.address, token="alice-token") as alice, Client(s2.address, token="bob-token") as bob:
        assert alice.get_session("alice-run").step == 1
        with pytest.raises(OptregError) as e:
            bob.get_session("alice-run")
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "alice-token" not in (tmp_path / "d" / "sessions" / "alice-run.safetensors").read_bytes().decode("latin-1")


def _self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), cert_pem


def test_tls_with_tokens_end_to_end(start_server, tokens, tmp_path):
    cert, key, cert_pem = _self_signed(tmp_path)
    s = start_server("--memory-only", "--tls-cert", cert, "--tls-key", key, "--token-file", tokens)
    with Client(s.address, token="alice-token", root_certificates=cert_pem) as c:
        W = np.ones(3)
        sess = c.create_session("sgd", {"W": W}, lr=0.5)
        sess.step({"W": np.ones(3)})
        np.testing.assert_array_equal(W, np.full(3, 0.5))
    with Client(s.address, token="alice-token", timeout=5, retry=RetryPolicy(total_seconds=0)) as plain:  # plaintext to a TLS port
        with pytest.raises(OptregError) as e:
            plain.list_sessions()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    with Client(s.address, root_certificates=cert_pem) as no_token:
        with pytest.raises(OptregError) as e:
            no_token.list_sessions()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_non_loopback_needs_tls_and_tokens_or_allow_insecure(start_server):
    # ServerProcess passes --host 127.0.0.1 first; a later --host wins with argparse.
    with pytest.raises(RuntimeError, match="without TLS and tokens"):
        ServerProcess("--memory-only", "--host", "0.0.0.0")
    s = start_server("--memory-only", "--host", "0.0.0.0", "--allow-insecure")
    assert s.proc.poll() is None


def _free_port():
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


def _scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_metrics_endpoint(start_server, tmp_path):
    port = _free_port()
    s = start_server("--data-dir", str(tmp_path), "--metrics-port", str(port))
    with Client(s.address) as c:
        sess = c.create_session("sgd", {"W": np.ones(3)})
        for _ in range(5):
            sess.step({"W": np.ones(3)})
        with pytest.raises(OptregError):
            sess.step({"W": np.ones(4)})
        c.create_session("sgd", {"W": np.ones(3)}, durability="none")
    m = _scrape(port)
    assert m['optreg_steps_total{replayed="false"}'] == 5
    assert m["optreg_step_seconds_count"] == 5
    assert m['optreg_errors_total{code="INVALID_ARGUMENT",method="Step"}'] == 1
    assert m["optreg_received_bytes_total"] > 5 * 24 and m["optreg_sent_bytes_total"] > 5 * 24
    assert m["optreg_sessions_loaded"] == 2 and m["optreg_sessions_on_disk"] == 1
    assert m["optreg_checkpoints_total"] == 1  # the create's snapshot; the steps went to the log
    assert m["optreg_log_records_total"] == 5 and m["optreg_log_bytes_total"] >= 5 * 24
