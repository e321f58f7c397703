"""How a kepler-log client protects and authenticates its Kafka connections (TLS, SASL/SCRAM).

One `kafka.security` section, read the same way by the agent and the consumer, turned into
kafka-python's client arguments. Why a module of its own: the rules are security rules and must
not drift between two copies, and every error must name the key and the file at startup, not
surface later as an opaque handshake failure in a retry loop.

Secrets never sit in the config or on a command line: the SCRAM password is read from
`password_file`, which must not be readable by group or others (a world-readable secret is
refused, not warned about). The password is kept out of `repr()` so that a logged config never
shows it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from keplerlog.confkit import ConfigError, boolean, choice, section, string

PROTOCOLS = ("plaintext", "ssl", "sasl_plaintext", "sasl_ssl")
MECHANISMS = ("scram-sha-512", "scram-sha-256")
MAX_SECRET_BYTES = 4096  # a password file is one short line; anything bigger is a mistake
KEYS = {
    "protocol",
    "cafile",
    "certfile",
    "keyfile",
    "check_hostname",
    "sasl_mechanism",
    "username",
    "password_file",
}


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    """The validated `kafka.security` section (default: plaintext, no authentication)."""

    protocol: str = "plaintext"
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    check_hostname: bool = True
    sasl_mechanism: str = "scram-sha-512"
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        """True when the connection is encrypted."""
        return self.protocol in ("ssl", "sasl_ssl")

    @property
    def sasl(self) -> bool:
        """True when the client authenticates with SASL."""
        return self.protocol in ("sasl_plaintext", "sasl_ssl")

    def client_kwargs(self) -> dict[str, Any]:
        """kafka-python arguments for KafkaProducer, KafkaConsumer and KafkaAdminClient."""
        out: dict[str, Any] = {"security_protocol": self.protocol.upper()}
        if self.tls:
            out["ssl_check_hostname"] = self.check_hostname
            for key in ("cafile", "certfile", "keyfile"):
                if getattr(self, key):
                    out[f"ssl_{key}"] = getattr(self, key)
        if self.sasl:
            out["sasl_mechanism"] = self.sasl_mechanism.upper()
            out["sasl_plain_username"] = self.username
            out["sasl_plain_password"] = self.password
        return out

    def rdkafka_conf(self) -> dict[str, Any]:
        """Return the settings for librdkafka (confluent-kafka): the agent's producer, the consumer."""
        conf: dict[str, Any] = {"security.protocol": self.protocol}
        if self.tls:
            conf["ssl.endpoint.identification.algorithm"] = "https" if self.check_hostname else "none"
            for key, name in (
                ("cafile", "ssl.ca.location"),
                ("certfile", "ssl.certificate.location"),
                ("keyfile", "ssl.key.location"),
            ):
                if getattr(self, key):
                    conf[name] = getattr(self, key)
        if self.sasl:
            conf["sasl.mechanism"] = self.sasl_mechanism.upper()
            conf["sasl.username"] = self.username
            conf["sasl.password"] = self.password
        return conf


# The Kafka client (kafka.client) of the agent and of the consumer: kafka-python (pure Python, the
# default) or librdkafka through confluent-kafka (an optional compiled dependency,
# keplerlog[librdkafka]); see agent/rdsender.py and consumer/rdclient.py.
CLIENTS = ("kafka-python", "librdkafka")


def parse_client(raw: Any, where: str = "kafka.client") -> str:
    """Validate the client choice; librdkafka only when confluent-kafka is installed."""
    client = choice(raw, where, CLIENTS)
    if client == "librdkafka" and importlib.util.find_spec("confluent_kafka") is None:
        raise ConfigError(
            f"{where}: librdkafka needs the confluent-kafka package (pip install 'keplerlog[librdkafka]')"
        )
    return client


def _readable_file(value: Any, where: str) -> str:
    path = string(value, where)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:  # missing, or a directory on the way closed to this user
        raise ConfigError(f"{where}: {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{where}: {path}: not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{where}: {path}: not readable by this user")
    return path


def read_secret(path: str, where: str) -> str:
    """Return the first line of a secret file that only its owner (and root) may read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"{where}: {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{where}: {path}: not a regular file")
        if mode & 0o077:
            raise ConfigError(
                f"{where}: {path}: readable by group or others (mode {mode & 0o777:04o}); chmod 0600 or 0400"
            )
        data = f.read(MAX_SECRET_BYTES + 1)
    if len(data) > MAX_SECRET_BYTES:
        raise ConfigError(f"{where}: {path}: larger than {MAX_SECRET_BYTES} bytes; not a password file?")
    secret = data.decode("utf-8", "replace").splitlines()[0] if data.strip() else ""
    if not secret:
        raise ConfigError(f"{where}: {path}: empty")
    return secret


def parse_security(raw: Any, where: str = "kafka.security") -> KafkaSecurity:
    """Validate a `kafka.security` mapping (None: plaintext); files are checked now."""
    sec = section(raw, where, KEYS)
    protocol = choice(sec.get("protocol", "plaintext"), f"{where}.protocol", PROTOCOLS)
    tls, sasl = protocol in ("ssl", "sasl_ssl"), protocol in ("sasl_plaintext", "sasl_ssl")
    tls_keys = [k for k in ("cafile", "certfile", "keyfile", "check_hostname") if k in sec]
    if tls_keys and not tls:
        raise ConfigError(f"{where}: {', '.join(tls_keys)} need protocol ssl or sasl_ssl, not {protocol}")
    sasl_keys = [k for k in ("sasl_mechanism", "username", "password_file") if k in sec]
    if sasl_keys and not sasl:
        raise ConfigError(
            f"{where}: {', '.join(sasl_keys)} need protocol sasl_ssl or sasl_plaintext, not {protocol}"
        )
    files = {k: _readable_file(sec[k], f"{where}.{k}") for k in ("cafile", "certfile", "keyfile") if k in sec}
    if ("certfile" in files) != ("keyfile" in files):
        raise ConfigError(f"{where}: certfile and keyfile go together (client certificate)")
    username = password = None
    if sasl:
        for key in ("username", "password_file"):
            if key not in sec:
                raise ConfigError(f"{where}.{key}: required for protocol {protocol}")
        username = string(sec["username"], f"{where}.username")
        pw_where = f"{where}.password_file"
        password = read_secret(string(sec["password_file"], pw_where), pw_where)
    return KafkaSecurity(
        protocol=protocol,
        cafile=files.get("cafile"),
        certfile=files.get("certfile"),
        keyfile=files.get("keyfile"),
        check_hostname=boolean(sec.get("check_hostname", True), f"{where}.check_hostname"),
        sasl_mechanism=choice(
            sec.get("sasl_mechanism", "scram-sha-512"), f"{where}.sasl_mechanism", MECHANISMS
        ),
        username=username,
        password=password,
    )


class ConnectionProblems(logging.Handler):
    """Remembers why kafka-python's last connection attempt failed.

    kafka-python 3 reports a refused login, an unknown CA or a wrong host name only in its own
    log; what the caller catches is a bare "Unable to bootstrap" timeout. Attached to the
    `kafka` logger (whatever its level for output), this keeps the last reason so that the
    agent and the consumer can say what is wrong instead of "not reachable".
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the reason of a lost or failed connection (the rest is not ours to judge)."""
        message = record.getMessage()
        if "Connection lost" in message or "Connection failed" in message:
            cause = message.split(": ", 1)[-1][:500]
            # a broker drops the connections that follow a refused login ("socket disconnected"):
            # such a generic cause does not replace the specific one it follows
            if not (self.last and _specific(self.last) and not _specific(cause)):
                self.last = cause

    def explain(self, exc: BaseException) -> str:
        """Put the failure in words an operator can act on, with the raw cause."""
        cause = self.last or f"{type(exc).__name__}: {exc}"
        if "Authentication failed" in cause or "SaslAuthenticationFailed" in cause:
            return f"login refused: wrong user name or password (check kafka.security) [{cause}]"
        if "CERTIFICATE_VERIFY_FAILED" in cause and "hostname" in cause.lower():
            return f"the broker's certificate does not name the host in bootstrap_servers [{cause}]"
        if "CERTIFICATE_VERIFY_FAILED" in cause:
            return f"the broker's certificate is not signed by kafka.security.cafile's CA [{cause}]"
        return f"not reachable [{cause}]"


def _specific(cause: str) -> bool:
    return "Authentication" in cause or "CERTIFICATE_VERIFY_FAILED" in cause


def watch_connection_problems(quiet: bool = False) -> ConnectionProblems:
    """Attach (once per process) and return the handler that keeps the last connection problem.

    The `kafka` logger must pass WARNING records for the handler to see them. `quiet` keeps
    them out of the process's own log (the agent, whose outage handling logs its own summary):
    the logger then stops propagating and this handler is its only one.
    """
    logger = logging.getLogger("kafka")
    handler = next((h for h in logger.handlers if isinstance(h, ConnectionProblems)), None)
    if handler is None:
        handler = ConnectionProblems()
        logger.addHandler(handler)
    if quiet:
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    elif logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    return handler
