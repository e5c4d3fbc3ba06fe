"""Authentication to the cluster: the TLS and SASL options of every client, and the token
providers of SASL OAUTHBEARER.

``KAFKA_SECURITY_PROTOCOL`` picks TLS (``SSL``, ``SASL_SSL``) and SASL (``SASL_*``);
``KAFKA_SASL_MECHANISM`` the SASL mechanism:

- ``PLAIN``, ``SCRAM-SHA-256``, ``SCRAM-SHA-512``: ``KAFKA_SASL_USERNAME`` and
  ``KAFKA_SASL_PASSWORD``.
- ``OAUTHBEARER``: a token from one of ``KAFKA_SASL_OAUTH_TOKEN`` (a fixed token),
  ``KAFKA_SASL_OAUTH_TOKEN_FILE`` (a file, read again whenever it changes, such as a token
  a sidecar or a Kubernetes projected volume refreshes) or ``KAFKA_SASL_OAUTH_MSK_REGION``
  (AWS MSK IAM: tokens signed with the process's AWS credentials by
  ``aws-msk-iam-sasl-signer-python``, the ``msk`` extra, renewed before they expire).
  ``KAFKA_SASL_OAUTH_EXTENSIONS`` adds SASL extensions to the login (Confluent Cloud wants
  ``logicalCluster`` and ``identityPoolId``).
- ``GSSAPI`` (Kerberos; aiokafka's ``gssapi`` extra, and a ticket from ``kinit`` or a
  keytab): ``KAFKA_SASL_KERBEROS_SERVICE_NAME`` and ``KAFKA_SASL_KERBEROS_DOMAIN_NAME``.

TLS takes ``KAFKA_SSL_CAFILE``, and for a client certificate ``KAFKA_SSL_CERTFILE``,
``KAFKA_SSL_KEYFILE`` and ``KAFKA_SSL_KEY_PASSWORD`` (a key stored encrypted).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from aiokafka.abc import AbstractTokenProvider
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import SaslAuthenticateRequest, SaslHandShakeRequest

from ..errors import ConfigError
from ..settings import KafkaSettings

__all__ = ["FileToken", "MskIamToken", "StaticToken", "oauth_refusal", "security_options",
           "token_variable"]

MSK_RENEW_BEFORE_S = 60.0  # an MSK IAM token is renewed this long before it expires
TOKEN_WARN_EVERY_S = 60.0  # a renewal failing again and again: one warning per this
log = logging.getLogger("streamproc.kafka")


class _Provider(AbstractTokenProvider):  # type: ignore[misc]
    """A token provider with ``KAFKA_SASL_OAUTH_EXTENSIONS`` (aiokafka sends what
    :meth:`extensions` returns with the token) that outlives a failed renewal.

    aiokafka asks for a token on every new connection, and its background loops (fetcher,
    coordinator, sender) survive only Kafka's and the network's errors. So once a token was
    good, a renewal that fails (a token file rewritten in place and empty for a moment, the
    MSK signer without credentials for a while) keeps the last good token and logs a
    warning, at most once a minute; the broker judges it. Before any good token (start-up),
    the failure is a :class:`ConfigError` naming ``variable``."""

    variable = ""

    def __init__(self, source: str, extensions: dict[str, str] | None = None) -> None:
        self._source = source  # the variable's value, for the ConfigError
        self._extensions = dict(extensions or {})
        self._good: str | None = None
        self._warn_after = 0.0  # monotonic, s

    def extensions(self) -> dict[str, str]:
        return self._extensions

    async def token(self) -> str:
        try:
            token = await self._renew()
        except Exception as exc:  # the signer's own errors too (botocore's)
            problem = exc if isinstance(exc, ConfigError) else ConfigError(
                self.variable, self._source, f"no token: {exc}")
            if self._good is None:
                raise problem from None
            if (now := time.monotonic()) >= self._warn_after:
                self._warn_after = now + TOKEN_WARN_EVERY_S
                log.warning("%s; logging in with the last good token", problem)
            return self._good
        self._good = token
        return token

    async def _renew(self) -> str:
        raise NotImplementedError


class StaticToken(_Provider):
    """``KAFKA_SASL_OAUTH_TOKEN``: the same token on every connection."""

    variable = "KAFKA_SASL_OAUTH_TOKEN"

    def __init__(self, token: str, extensions: dict[str, str] | None = None) -> None:
        super().__init__("**********", extensions)
        self._token = token

    async def _renew(self) -> str:
        return self._token


class FileToken(_Provider):
    """``KAFKA_SASL_OAUTH_TOKEN_FILE``: the file's content, stripped, read again whenever
    its modification time or size changes (checked on each new connection)."""

    variable = "KAFKA_SASL_OAUTH_TOKEN_FILE"

    def __init__(self, path: str, extensions: dict[str, str] | None = None) -> None:
        super().__init__(path, extensions)
        self.path = Path(path)
        self._seen: tuple[int, int] | None = None
        self._token = ""

    async def _renew(self) -> str:
        try:
            stat = self.path.stat()
            if (stat.st_mtime_ns, stat.st_size) != self._seen:
                self._token = self.path.read_text(encoding="utf-8").strip()
                self._seen = (stat.st_mtime_ns, stat.st_size)
        except OSError as exc:
            raise ConfigError(self.variable, str(self.path),
                              f"cannot read it: {exc.strerror or exc}") from None
        if not self._token:
            raise ConfigError(self.variable, str(self.path), "it is empty")
        return self._token


class MskIamToken(_Provider):
    """``KAFKA_SASL_OAUTH_MSK_REGION``: AWS MSK IAM tokens from the signer package (the
    ``msk`` extra, imported on first use), each kept until a minute before it expires."""

    variable = "KAFKA_SASL_OAUTH_MSK_REGION"

    def __init__(self, region: str, extensions: dict[str, str] | None = None) -> None:
        super().__init__(region, extensions)
        self.region = region
        self._token = ""
        self._expires_at = 0.0  # wall clock, s

    async def _renew(self) -> str:
        if time.time() < self._expires_at - MSK_RENEW_BEFORE_S:
            return self._token
        try:
            from aws_msk_iam_sasl_signer import MSKAuthTokenProvider
        except ImportError:
            raise ConfigError(self.variable, self.region,
                              "needs the msk extra: pip install 'streamproc[msk]'") from None
        token, expiry_ms = await asyncio.to_thread(MSKAuthTokenProvider.generate_auth_token,
                                                   self.region)
        self._token, self._expires_at = str(token), float(expiry_ms) / 1000
        return self._token


def token_variable(settings: KafkaSettings) -> str:
    """The variable that gives OAUTHBEARER its token (the settings require exactly one)."""
    if settings.kafka_sasl_oauth_token_file:
        return "KAFKA_SASL_OAUTH_TOKEN_FILE"
    if settings.kafka_sasl_oauth_msk_region:
        return "KAFKA_SASL_OAUTH_MSK_REGION"
    return "KAFKA_SASL_OAUTH_TOKEN"


def _token_provider(settings: KafkaSettings) -> _Provider:
    extensions = settings.kafka_sasl_oauth_extensions
    if settings.kafka_sasl_oauth_token_file:
        return FileToken(os.path.expanduser(settings.kafka_sasl_oauth_token_file), extensions)
    if settings.kafka_sasl_oauth_msk_region:
        return MskIamToken(settings.kafka_sasl_oauth_msk_region, extensions)
    token = settings.kafka_sasl_oauth_token
    return StaticToken(token.get_secret_value() if token else "", extensions)


def security_options(settings: KafkaSettings) -> dict[str, Any]:
    """The TLS and SASL options of a client, from the settings."""
    options: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        key_password = settings.kafka_ssl_key_password
        options["ssl_context"] = create_ssl_context(
            cafile=settings.kafka_ssl_cafile, certfile=settings.kafka_ssl_certfile,
            keyfile=settings.kafka_ssl_keyfile,
            password=key_password.get_secret_value() if key_password else None)
    if not settings.kafka_security_protocol.startswith("SASL"):
        return options
    mechanism = settings.kafka_sasl_mechanism or "PLAIN"
    options["sasl_mechanism"] = mechanism
    if mechanism == "OAUTHBEARER":
        options["sasl_oauth_token_provider"] = _token_provider(settings)
    elif mechanism == "GSSAPI":
        options["sasl_kerberos_service_name"] = settings.kafka_sasl_kerberos_service_name
        options["sasl_kerberos_domain_name"] = settings.kafka_sasl_kerberos_domain_name
    else:
        password = settings.kafka_sasl_password
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = password.get_secret_value() if password else None
    return options


async def oauth_refusal(settings: KafkaSettings, host: str, port: int) -> str | None:
    """OAUTHBEARER: the broker's refusal of the token, or None when it takes it (or cannot
    be reached: the clients' retries see to that).

    aiokafka takes a refusal for success: a broker answers a bad token with an error
    challenge (RFC 7628), which aiokafka does not read, so its clients go on and fail later
    with errors that do not say why. This logs in once on a connection of its own, with
    the same token, and reads the answer."""
    options = security_options(settings)
    provider = options.pop("sasl_oauth_token_provider")
    del options["sasl_mechanism"]
    options["security_protocol"] = ("SSL" if settings.kafka_security_protocol == "SASL_SSL"
                                    else "PLAINTEXT")
    try:
        conn = await create_conn(host, port, request_timeout_ms=10_000, **options)
    except (KafkaError, OSError):
        return None
    try:
        await conn.send(SaslHandShakeRequest("OAUTHBEARER"))
        token = await provider.token()
        extensions = "".join(f"\x01{k}={v}" for k, v in provider.extensions().items())
        answer = await conn.send(SaslAuthenticateRequest(
            f"n,,\x01auth=Bearer {token}{extensions}\x01\x01".encode()))
    except (KafkaError, OSError):
        return None
    finally:
        conn.close()
    if answer.error_code:
        return str(answer.error_message or f"error code {answer.error_code}")
    challenge = bytes(answer.sasl_auth_bytes or b"")
    return challenge.decode("utf-8", "replace") if challenge else None
