"""The inference credential without a server: where the SDK and the launcher read it, the header it
travels in, the flags it gives tritonserver, and that it shows in no repr, message or log."""
from __future__ import annotations

import logging

import pytest
from tritonclient.utils import InferenceServerException

from lesionserve.cli import main as cli_main
from lesionserve.server import CLOSED_HEADER, CREDENTIAL_APIS, PROTOCOL_GROUPS, RESTRICTED_APIS, TritonServer
from lesionserve_client import API_KEY_ENV, CredentialError, LesionClient, ServerUnavailableError
from lesionserve_client import cli as client_cli
from lesionserve_client.credentials import GRPC_API_KEY_HEADER, ApiKey, resolve_api_key
from tests.unit.test_client import FakeTritonClient, blobs_of, fake  # noqa: F401  (fake: the fixture)

KEY = "Zm9vYmFyLWxlc2lvbnNlcnZlLWtleQ_-12"


@pytest.fixture
def keyed(fake, monkeypatch):  # noqa: F811
    """The fake tritonclient, recording the headers of every call; refusing them unless they carry KEY."""
    from lesionserve_client import client as client_module

    class KeyedFake(FakeTritonClient):
        headers: list = []

        def _check(self, headers):
            KeyedFake.headers.append(headers)
            if (headers or {}).get(GRPC_API_KEY_HEADER) != KEY:
                raise InferenceServerException("This protocol is restricted, expecting header "
                                               f"'{GRPC_API_KEY_HEADER}'", status="StatusCode.UNAVAILABLE")

        def get_model_config(self, model_name, as_json=False, client_timeout=None, headers=None):
            self._check(headers)
            return super().get_model_config(model_name, as_json, client_timeout)

        def infer(self, model_name, inputs, outputs=None, client_timeout=None, headers=None, **kw):
            self._check(headers)
            return super().infer(model_name, inputs, outputs, client_timeout, **kw)

    monkeypatch.setattr(client_module, "InferenceServerClient", KeyedFake)
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    return KeyedFake


def test_resolve_api_key_reads_argument_then_file_then_environment(tmp_path):
    (tmp_path / "key").write_text(KEY + "\n")  # `echo KEY > file` adds a newline: dropped
    assert resolve_api_key(KEY, environ={}).value == KEY
    assert resolve_api_key(api_key_file=tmp_path / "key", environ={API_KEY_ENV: "other-key-0123456789"}).value == KEY
    from_env = resolve_api_key(environ={API_KEY_ENV: KEY})
    assert from_env.value == KEY and from_env.source == f"${API_KEY_ENV}"
    assert resolve_api_key(environ={}) is None


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"api_key": "short"}, ValueError, "the API key from the api_key argument is 5 characters long; it must be 16 to 4096"),
        ({"api_key": "a" * 20 + " b"}, ValueError, "has a character outside A-Z, a-z, 0-9 and - . _ ~ + / = at position 20"),
        ({"environ": {API_KEY_ENV: " "}}, ValueError, f"{API_KEY_ENV} is set but empty"),
        ({"api_key": KEY, "api_key_file": "k"}, ValueError, "give api_key or api_key_file, not both"),
        ({"api_key_file": "/nonexistent/api-key"}, FileNotFoundError, "API key file not found: '/nonexistent/api-key'"),
    ],
    ids=["too_short", "bad_character", "empty_env", "both", "missing_file"],
)
def test_resolve_api_key_refuses_naming_the_source_and_never_the_key(kwargs, error, message):
    kwargs.setdefault("environ", {})
    with pytest.raises(error) as info:
        resolve_api_key(**kwargs)
    assert message in str(info.value)
    assert "a" * 20 not in str(info.value)


def test_client_sends_the_key_with_every_call_and_shows_it_nowhere(keyed, caplog):
    caplog.set_level(logging.DEBUG, logger="lesionserve_client")
    with LesionClient("a:1", api_key=KEY, max_images_per_request=2) as client:
        client.classify(blobs_of(4))
        shown = repr(client)
    assert keyed.headers == [{GRPC_API_KEY_HEADER: KEY}] * 3  # the config, then 2 requests
    assert KEY not in shown and "api_key=ApiKey(<34 characters from the api_key argument>)" in shown
    assert KEY not in repr(ApiKey(KEY, "x")) + str(ApiKey(KEY, "x")) + caplog.text


def test_client_reads_the_key_from_the_environment_when_not_given(keyed, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, KEY)
    with LesionClient("a:1") as client:
        assert len(client.classify(blobs_of(1))) == 1


def test_refused_credential_raises_credential_error_at_once_naming_the_source_not_the_key(keyed, monkeypatch):
    with LesionClient(["a:1", "b:2"], retries=3) as client, pytest.raises(CredentialError) as missing:
        client.classify(blobs_of(1))
    assert "no API key was sent: set LESIONSERVE_API_KEY or pass api_key_file" in str(missing.value)
    assert not isinstance(missing.value, ServerUnavailableError) and keyed.sleeps == []
    assert len(keyed.headers) == 1  # not retried, not sent to the other replica
    wrong = "wrong-key-but-well-formed-0123"
    with LesionClient("a:1", api_key=wrong) as client, pytest.raises(CredentialError) as refused:
        client.classify(blobs_of(1))
    message = str(refused.value)
    print(message)
    assert "expecting header 'triton-grpc-protocol-lesionserve-key'" in message
    assert "the API key sent (from the api_key argument) is not the server's" in message and wrong not in message


def test_client_refuses_verbose_with_a_key_since_tritonclient_prints_headers(keyed):
    with pytest.raises(ValueError, match="verbose=True makes tritonclient print every request's headers"):
        LesionClient("a:1", api_key=KEY, verbose=True)


def test_client_cli_exits_2_naming_a_missing_key_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    image = tmp_path / "x.jpg"
    image.write_bytes(b"x")
    code = client_cli.main(["classify", str(image), "--api-key-file", str(tmp_path / "no-key")])
    assert code == 2 and f"API key file not found: '{tmp_path / 'no-key'}'" in capsys.readouterr().err


# -- the launcher ---------------------------------------------------------------------------


def restrictions(cmd: list[str], flag: str) -> dict[str, tuple[str, ...]]:
    """header -> the protocol groups a flag restricts by it."""
    out = {}
    for arg in cmd:
        if arg.startswith(f"{flag}="):
            groups, header = arg.split("=", 1)[1].split(":", 1)
            out[header.split("=", 1)[0]] = tuple(groups.split(","))
    return out


def test_server_command_requires_the_key_over_grpc_and_leaves_http_to_health_when_api_key(tmp_path):
    server = TritonServer(tmp_path, grpc_port=0, http_port=0, metrics_port=0, api_key=KEY)
    cmd = server.command()
    assert f"--grpc-restricted-protocol={','.join(CREDENTIAL_APIS)}:lesionserve-key={KEY}" in cmd
    assert restrictions(cmd, "--grpc-restricted-protocol") == {"lesionserve-key": CREDENTIAL_APIS,
                                                               "lesionserve-admin": RESTRICTED_APIS}
    http = restrictions(cmd, "--http-restricted-api")
    assert http == {CLOSED_HEADER: tuple(g for g in PROTOCOL_GROUPS if g != "health")}
    closed = next(a for a in cmd if a.startswith("--http-restricted-api=")).rsplit("=", 1)[1]
    assert len(closed) == 32 and closed not in repr(server) and KEY not in repr(server)
    admin = TritonServer(tmp_path, api_key=KEY, admin_apis=True).command()
    assert restrictions(admin, "--grpc-restricted-protocol") == {"lesionserve-key": CREDENTIAL_APIS + RESTRICTED_APIS}


def test_server_command_closes_plain_http_inference_beside_a_tls_grpc_port(tmp_path):
    cmd = TritonServer(tmp_path, ssl_cert=tmp_path / "s.crt", ssl_key=tmp_path / "s.key").command()
    assert restrictions(cmd, "--http-restricted-api") == {CLOSED_HEADER: tuple(g for g in PROTOCOL_GROUPS if g != "health")}
    assert restrictions(TritonServer(tmp_path).command(), "--http-restricted-api") == {"lesionserve-admin": RESTRICTED_APIS}


@pytest.mark.parametrize(
    ("tls", "key", "missing"),
    [(False, False, "TLS (--grpc-ssl-cert and --grpc-ssl-key) and an API key"), (True, False, "missing: an API key"),
     (False, True, "missing: TLS")],
)
def test_server_refuses_a_host_beyond_loopback_without_tls_and_a_key(tmp_path, tls, key, missing):
    certs = dict(ssl_cert=tmp_path / "s.crt", ssl_key=tmp_path / "s.key") if tls else {}
    with pytest.raises(ValueError, match="host '0.0.0.0' exposes the server beyond loopback") as info:
        TritonServer(tmp_path, host="0.0.0.0", api_key=KEY if key else None, **certs)
    assert missing in str(info.value)


def test_server_exposed_with_tls_and_key_keeps_metrics_on_loopback(tmp_path):
    cmd = TritonServer(tmp_path, host="0.0.0.0", api_key=KEY, ssl_cert=tmp_path / "s.crt", ssl_key=tmp_path / "s.key").command()
    assert "--grpc-address=0.0.0.0" in cmd and "--http-address=0.0.0.0" in cmd and "--metrics-address=127.0.0.1" in cmd


def test_serve_exits_2_before_starting_anything_when_exposed_without_tls_or_key(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert cli_main(["serve", "--repository", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "exposes the server beyond loopback" in capsys.readouterr().err
    monkeypatch.setenv(API_KEY_ENV, "tiny")
    assert cli_main(["serve", "--repository", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"the API key from ${API_KEY_ENV} is 4 characters long" in err and "tiny" not in err
