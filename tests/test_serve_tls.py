"""`edgekit serve` over TLS and mutual TLS, with a real TLS client on loopback.

A throwaway CA, a server certificate for 127.0.0.1 and client certificates (one from the CA,
one from a stranger's CA) are made in the test with ``cryptography``. The TLS 1.1 check first
proves that this machine's OpenSSL can speak TLS 1.1 at all (a control server that allows it),
so a refusal by edgekit's server is the server's doing, not the client's.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import socket
import ssl
import threading
from pathlib import Path

import pytest
from conftest import run_cli
from test_serve import bundle, start  # noqa: F401


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject_key, subject: str, issuer_key=None, issuer: str | None = None, *, ca=False, server=False, client=False,
          days=(-1, 30)):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer or subject))
               .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now + datetime.timedelta(days=days[0])).not_valid_after(now + datetime.timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False, encipher_only=False,
                                                      decipher_only=False), critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()), critical=False)
    else:
        issuer_public = (issuer_key or subject_key).public_key()
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key or subject_key, hashes.SHA256())


def _write(path: Path, cert=None, key=None, password: bytes | None = None) -> str:
    from cryptography.hazmat.primitives import serialization

    data = b""
    if cert is not None:
        data += cert.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        data += key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_key, server_key, client_key, stranger_key = (_key() for _ in range(5))
    ca = _cert(ca_key, "edgekit test CA", ca=True)
    rogue = _cert(rogue_key, "someone else's CA", ca=True)
    return {
        "dir": d,
        "ca": _write(d / "ca.pem", ca),
        "server_cert": _write(d / "server.pem", _cert(server_key, "127.0.0.1", ca_key, "edgekit test CA", server=True)),
        "server_key": _write(d / "server.key", key=server_key),
        "client": (_write(d / "client.pem", _cert(client_key, "client", ca_key, "edgekit test CA", client=True)),
                   _write(d / "client.key", key=client_key)),
        "stranger": (_write(d / "stranger.pem", _cert(stranger_key, "stranger", rogue_key, "someone else's CA", client=True)),
                     _write(d / "stranger.key", key=stranger_key)),
        "encrypted_key": _write(d / "encrypted.key", key=server_key, password=b"secret"),
        "other_key": _write(d / "other.key", key=_key()),
        "expired": _write(d / "expired.pem", _cert(server_key, "127.0.0.1", ca_key, "edgekit test CA", server=True,
                                                   days=(-30, -1))),
    }


def client_context(pki, *, cert=None, minimum=None, maximum=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki["ca"])
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def https_get(server, context, path="/v1/models"):
    """(status, body, negotiated TLS version) over a fresh TLS connection."""
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), conn.sock.version()
    finally:
        conn.close()


def test_tls_13_is_negotiated_12_accepted_11_refused(start, pki):
    server = start(tls_cert=pki["server_cert"], tls_key=pki["server_key"], load=False)
    assert server.url.startswith("https://127.0.0.1:")
    status, models, version = https_get(server, client_context(pki))
    assert (status, version) == (200, "TLSv1.3") and models["data"][0]["id"] == "tiny"
    status, _, version = https_get(server, client_context(pki, maximum=ssl.TLSVersion.TLSv1_2))
    assert (status, version) == (200, "TLSv1.2")
    with pytest.raises(ssl.SSLError):  # no certificate check skipped: a client that does not trust the CA refuses
        https_get(server, ssl.create_default_context())
    # plain HTTP to the TLS port: no answer in clear text
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            data = s.recv(1000)
        except ConnectionResetError:
            data = b""
        assert b"tiny" not in data


def _tls11_client() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def test_tls_11_is_refused(start, pki):
    # control: a server that allows TLS 1.1, so that the client below can speak it on this machine
    control = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    control.minimum_version = ssl.TLSVersion.TLSv1
    control.set_ciphers("DEFAULT:@SECLEVEL=0")
    control.load_cert_chain(pki["server_cert"], pki["server_key"])
    listener = socket.create_server(("127.0.0.1", 0))
    versions = []

    def serve_one():
        conn, _ = listener.accept()
        try:
            with control.wrap_socket(conn, server_side=True) as tls:
                versions.append(tls.version())
        except (ssl.SSLError, OSError):
            pass

    worker = threading.Thread(target=serve_one, daemon=True)
    worker.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=30) as raw:
            with _tls11_client().wrap_socket(raw) as tls:
                assert tls.version() == "TLSv1.1"
    except (ssl.SSLError, OSError) as exc:
        pytest.skip(f"this machine's OpenSSL cannot speak TLS 1.1 at all ({exc}); nothing to check")
    finally:
        worker.join(30)
        listener.close()
    server = start(tls_cert=pki["server_cert"], tls_key=pki["server_key"], load=False)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        with pytest.raises(ssl.SSLError):
            _tls11_client().wrap_socket(raw)
    status, _, version = https_get(server, client_context(pki))  # and the server serves on
    assert (status, version) == (200, "TLSv1.3")


def _refused(server, context) -> bool:
    """True when the server will not talk to this client (TLS 1.3 reports a client certificate
    refusal at the first read, not during the client's handshake)."""
    try:
        https_get(server, context)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
        return True
    return False


def test_mutual_tls_requires_a_client_certificate_from_the_ca(start, pki):
    server = start(tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"], load=False)
    assert _refused(server, client_context(pki))  # no client certificate
    assert _refused(server, client_context(pki, cert=pki["stranger"]))  # one from another CA
    assert _refused(server, client_context(pki, cert=pki["stranger"], maximum=ssl.TLSVersion.TLSv1_2))
    status, models, version = https_get(server, client_context(pki, cert=pki["client"]))
    assert status == 200 and models["object"] == "list" and version == "TLSv1.3"
    status, _, version = https_get(server, client_context(pki, cert=pki["client"], maximum=ssl.TLSVersion.TLSv1_2))
    assert (status, version) == (200, "TLSv1.2")
    # without --tls-client-ca the same anonymous client is welcome
    open_server = start(tls_cert=pki["server_cert"], tls_key=pki["server_key"], load=False)
    assert https_get(open_server, client_context(pki))[0] == 200


def test_bad_tls_files_are_one_line_errors(bundle, pki, tmp_path):
    from edgekit.errors import EdgekitError
    from edgekit.runtime.bundle import resolve_config
    from edgekit.serve.server import EdgekitServer, ServeOptions

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    config = resolve_config(bundle)
    cases = [
        (dict(tls_cert=str(tmp_path / "missing.pem"), tls_key=pki["server_key"]), "--tls-cert .*missing.pem: no such file"),
        (dict(tls_cert=pki["server_cert"], tls_key=str(tmp_path / "missing.key")), "--tls-key .*: no such file"),
        (dict(tls_cert=str(garbage), tls_key=pki["server_key"]), "not a PEM certificate"),
        (dict(tls_cert=pki["server_cert"], tls_key=str(garbage)), "--tls-key .*: not a PEM private key"),
        (dict(tls_cert=pki["server_cert"], tls_key=pki["encrypted_key"]), "encrypted with a passphrase"),
        (dict(tls_cert=pki["server_cert"], tls_key=pki["other_key"]), "cannot use them together"),
        (dict(tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=str(garbage)),
         "--tls-client-ca .*: not a PEM certificate"),
        (dict(tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=str(tmp_path)), "no such file"),
        (dict(tls_cert=pki["server_cert"]), "--tls-key is missing"),
        (dict(tls_client_ca=pki["ca"]), "--tls-client-ca needs TLS"),
    ]
    for kwargs, message in cases:
        with pytest.raises(EdgekitError, match=message):
            EdgekitServer(bundle, ServeOptions(port=0, **kwargs), config=config)
    # through the command: one line, exit 2, no traceback
    result = run_cli("serve", str(bundle), "--port", "0", "--tls-cert", str(garbage), "--tls-key", pki["server_key"])
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: --tls-cert") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    result = run_cli("serve", str(bundle), "--port", "0", "--tls-cert", pki["server_cert"])
    assert result.returncode == 2 and "--tls-key is missing" in result.stderr


def test_an_expired_certificate_is_a_warning(bundle, pki):
    from edgekit.runtime.bundle import resolve_config
    from edgekit.serve.server import EdgekitServer, ServeOptions

    lines = []
    server = EdgekitServer(bundle, ServeOptions(port=0, tls_cert=pki["expired"], tls_key=pki["server_key"]),
                           config=resolve_config(bundle), log=lines.append)
    try:
        assert any("expired" in line for line in lines), lines
        assert server.url.startswith("https://")
    finally:
        server.stop(0)
