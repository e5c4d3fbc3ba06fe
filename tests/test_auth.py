"""Authentication end to end against a real broker with a SASL listener (``second_broker``,
started once beside the session's): SCRAM-SHA-256 and -512 with users made when its
storage is formatted, and OAUTHBEARER with Kafka's unsecured JWS validator (a token signed
with ``alg: none``). A login the broker refuses stops start-up at once, naming the variable
to fix. Then the pure parts: the token file read again when it changes, the one-token-source
rule, and an encrypted TLS client key opened with ``KAFKA_SSL_KEY_PASSWORD``."""

from __future__ import annotations

import base64
import os
import ssl
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import orjson
import pytest

from streamproc.errors import ConfigError
from streamproc.kafka.auth import FileToken, MskIamToken, security_options
from streamproc.kafka.topics import ensure_topics
from streamproc.settings import Settings, load_settings
from tests.conftest import SECOND_BROKER_USER
from tests.helpers import (
    items,
    output_ids,
    produce,
    running_processor,
    settings_for,
    wait_for_output,
)

pytestmark = pytest.mark.kafka

USER, PASSWORD = SECOND_BROKER_USER


def unsecured_jwt(subject: str, lifetime_s: float = 3600) -> str:
    """A JWS with ``alg: none``, as Kafka's unsecured validator takes it."""
    def part(claims: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=").decode()

    now = time.time()
    return (f"{part({'alg': 'none'})}."
            f"{part({'sub': subject, 'iat': now, 'exp': now + lifetime_s})}.")


def sasl_settings(bootstrap: str, mechanism: str, **overrides: Any) -> Settings:
    return settings_for(bootstrap, kafka_security_protocol="SASL_PLAINTEXT",
                        kafka_sasl_mechanism=mechanism, kafka_create_topics=True,
                        kafka_topic_partitions=1, kafka_topic_replication_factor=1,
                        **overrides)


async def round_trip(settings: Settings, plaintext: str) -> None:
    """Topics created, two items summarized and committed, all over the SASL listener; read
    back through the plaintext one."""
    async with running_processor(settings):
        await produce(plaintext, settings.kafka_input_topic, items(2, "auth"))
        await wait_for_output(settings.model_copy(
            update={"kafka_bootstrap_servers": plaintext}), 2, timeout_s=30)
    assert set(await output_ids(settings.model_copy(
        update={"kafka_bootstrap_servers": plaintext}))) == {"auth-0000", "auth-0001"}


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_scram_logs_in_and_summarizes(second_broker: tuple[str, str], mechanism: str) -> None:
    plaintext, sasl = second_broker
    await round_trip(sasl_settings(sasl, mechanism, kafka_sasl_username=USER,
                                   kafka_sasl_password=PASSWORD), plaintext)


async def test_oauthbearer_with_a_token_file_logs_in_and_summarizes(
        second_broker: tuple[str, str], tmp_path: Path) -> None:
    plaintext, sasl = second_broker
    token_file = tmp_path / "token"
    token_file.write_text(unsecured_jwt(USER) + "\n")
    settings = sasl_settings(sasl, "OAUTHBEARER", kafka_sasl_oauth_token_file=str(token_file),
                             kafka_sasl_oauth_extensions='{"traceId": "t-1"}')
    assert security_options(settings)["sasl_oauth_token_provider"].extensions() == {
        "traceId": "t-1"}
    await round_trip(settings, plaintext)


@pytest.mark.parametrize(("mechanism", "overrides", "variable"), [
    ("SCRAM-SHA-512", {"kafka_sasl_username": USER, "kafka_sasl_password": "wrong"},
     "KAFKA_SASL_USERNAME"),
    ("OAUTHBEARER", {"kafka_sasl_oauth_token": unsecured_jwt(USER, lifetime_s=-60)},
     "KAFKA_SASL_OAUTH_TOKEN"),
])
async def test_a_refused_login_stops_start_up_at_once_naming_the_variable(
        second_broker: tuple[str, str], mechanism: str, overrides: dict[str, str],
        variable: str) -> None:
    settings = sasl_settings(second_broker[1], mechanism, **overrides)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"^{variable}=.*authentication failed"):
        await ensure_topics(settings)
    assert time.monotonic() - started < settings.kafka_connect_timeout_s / 2


async def test_the_token_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    provider = FileToken(str(path))
    assert await provider.token() == "first"
    path.write_text("second-token\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    assert await provider.token() == "second-token"


async def test_a_token_that_cannot_be_renewed_keeps_the_last_good_one_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A sidecar rewriting the file in place leaves it empty for a moment, or gone: a
    connection made then logs in with the last good token (aiokafka's background loops die
    on any other error). With no good token yet, start-up stops naming the variable."""
    path = tmp_path / "token"
    provider = FileToken(str(path))
    with pytest.raises(ConfigError, match=r"^KAFKA_SASL_OAUTH_TOKEN_FILE=.*cannot read it"):
        await provider.token()
    path.write_text("")
    with pytest.raises(ConfigError, match=r"^KAFKA_SASL_OAUTH_TOKEN_FILE=.*it is empty"):
        await provider.token()
    path.write_text("good\n")
    assert await provider.token() == "good"
    path.write_text("")
    assert await provider.token() == "good"
    path.unlink()
    assert await provider.token() == "good"
    warnings = [r for r in caplog.records if "last good token" in r.getMessage()]
    assert len(warnings) == 1 and "KAFKA_SASL_OAUTH_TOKEN_FILE" in warnings[0].getMessage()
    path.write_text("renewed\n")
    assert await provider.token() == "renewed"


async def test_an_msk_signer_failure_keeps_the_last_good_token(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The signer's own errors (botocore's, no credentials) are not aiokafka's: before a
    good token they stop start-up naming the variable, after one the last good is kept."""
    answers: list[tuple[str, int] | Exception] = [RuntimeError("Unable to locate credentials")]

    class Signer:
        @staticmethod
        def generate_auth_token(region: str) -> tuple[str, int]:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    monkeypatch.setitem(sys.modules, "aws_msk_iam_sasl_signer",
                        types.SimpleNamespace(MSKAuthTokenProvider=Signer))
    provider = MskIamToken("eu-west-1")
    with pytest.raises(ConfigError, match=r"^KAFKA_SASL_OAUTH_MSK_REGION=.*credentials"):
        await provider.token()
    answers[:] = [("token-1", int((time.time() + 30) * 1000)), RuntimeError("expired")]
    assert [await provider.token(), await provider.token()] == ["token-1", "token-1"]


@pytest.mark.parametrize("sources", [{}, {"kafka_sasl_oauth_token": "t",
                                          "kafka_sasl_oauth_msk_region": "eu-west-1"}])
def test_oauthbearer_takes_exactly_one_token_source(sources: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"^KAFKA_SASL_OAUTH_TOKEN=.*exactly one of"):
        load_settings(None, kafka_security_protocol="SASL_SSL",
                      kafka_sasl_mechanism="OAUTHBEARER", **sources)


def test_an_encrypted_client_key_opens_with_kafka_ssl_key_password(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-days", "1",
                    "-passout", "pass:key-secret", "-subj", "/CN=client", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    files = {"kafka_security_protocol": "SSL", "kafka_ssl_certfile": str(cert),
             "kafka_ssl_keyfile": str(key)}
    opened = security_options(load_settings(None, kafka_ssl_key_password="key-secret", **files))
    assert isinstance(opened["ssl_context"], ssl.SSLContext)
    with pytest.raises(ssl.SSLError):
        security_options(load_settings(None, kafka_ssl_key_password="wrong", **files))


async def test_msk_iam_tokens_are_kept_until_a_minute_before_they_expire(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The signer package (the msk extra) stood in for by a module that counts its calls."""
    calls: list[str] = []

    class Signer:
        @staticmethod
        def generate_auth_token(region: str) -> tuple[str, int]:
            calls.append(region)
            return f"token-{len(calls)}", int((time.time() + lifetime[0]) * 1000)

    lifetime = [900.0]
    monkeypatch.setitem(sys.modules, "aws_msk_iam_sasl_signer",
                        types.SimpleNamespace(MSKAuthTokenProvider=Signer))
    provider = MskIamToken("eu-west-1")
    assert [await provider.token(), await provider.token()] == ["token-1", "token-1"]
    lifetime[0] = 30.0  # the next one expires within the minute: renewed on every ask
    provider = MskIamToken("eu-west-1")
    assert [await provider.token(), await provider.token()] == ["token-2", "token-3"]
    assert calls == ["eu-west-1"] * 3
    monkeypatch.setitem(sys.modules, "aws_msk_iam_sasl_signer", None)
    with pytest.raises(ConfigError, match=r"^KAFKA_SASL_OAUTH_MSK_REGION=.*msk extra"):
        await MskIamToken("eu-west-1").token()
