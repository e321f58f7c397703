"""The `kafka.security` section: validation, kafka-python arguments, secrets kept secret."""

from __future__ import annotations

import pytest
import yaml

from keplerlog.agent.config import parse as parse_agent
from keplerlog.confkit import ConfigError
from keplerlog.consumer.config import load_config
from keplerlog.kafkaauth import MAX_SECRET_BYTES, parse_security


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "password"
    path.write_text("s3cret-pw\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def ca(tmp_path):
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return path


def test_default_is_plaintext_without_credentials():
    assert parse_security(None).client_kwargs() == {"security_protocol": "PLAINTEXT"}


def test_sasl_ssl_gives_every_client_argument(secret, ca):
    sec = parse_security(
        {"protocol": "SASL_SSL", "cafile": str(ca), "username": "agent", "password_file": str(secret)}
    )
    assert sec.client_kwargs() == {
        "security_protocol": "SASL_SSL",
        "ssl_check_hostname": True,
        "ssl_cafile": str(ca),
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "agent",
        "sasl_plain_password": "s3cret-pw",
    }
    assert "s3cret-pw" not in repr(sec)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_password_file_others_can_read_is_refused(secret, mode):
    secret.chmod(mode)
    with pytest.raises(ConfigError, match="readable by group or others"):
        parse_security({"protocol": "sasl_ssl", "username": "agent", "password_file": str(secret)})


def test_a_password_file_past_the_size_cap_is_refused_not_cut(secret):
    secret.write_bytes(b"x" * (10 * MAX_SECRET_BYTES) + b"\n")
    with pytest.raises(ConfigError, match="larger than"):
        parse_security({"protocol": "sasl_ssl", "username": "agent", "password_file": str(secret)})


def test_a_symlinked_or_empty_password_file_is_refused(secret, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(secret)
    with pytest.raises(ConfigError, match="password_file"):
        parse_security({"protocol": "sasl_ssl", "username": "agent", "password_file": str(link)})
    secret.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        parse_security({"protocol": "sasl_ssl", "username": "agent", "password_file": str(secret)})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"protocol": "tls"}, "must be one of"),
        ({"protocol": "sasl_ssl", "username": "agent"}, "password_file: required"),
        ({"protocol": "plaintext", "cafile": "/etc/hostname"}, "need protocol ssl"),
        ({"protocol": "ssl", "username": "x"}, "need protocol sasl_ssl"),
        ({"protocol": "ssl", "cafile": "/nonexistent/ca.pem"}, "No such file or directory"),
        ({"protocol": "ssl", "cafile": "/etc"}, "not a file"),
        ({"protocol": "ssl", "certfile": "/etc/hostname"}, "go together"),
        ({"protocol": "ssl", "password": "inline"}, "unknown key"),
    ],
)
def test_bad_sections_get_a_clear_error(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_security(raw)


def test_agent_and_consumer_read_the_same_section(secret, ca, tmp_path):
    security = {"protocol": "sasl_ssl", "cafile": str(ca), "username": "u", "password_file": str(secret)}
    consumer = load_config(None, {"KEPLERLOG_BOOTSTRAP_SERVERS": "k:9093", "KEPLERLOG_ROOT": str(tmp_path)})
    assert consumer.security.protocol == "plaintext"
    conf = tmp_path / "consumer.yml"
    conf.write_text(yaml.safe_dump({"kafka": {"bootstrap_servers": "k:9093", "security": security}}))
    consumer = load_config(str(conf), {"KEPLERLOG_ROOT": str(tmp_path)})
    agent = parse_agent(
        {
            "service": "shop",
            "state_file": str(tmp_path / "state" / "agent.json"),
            "kafka": {"bootstrap_servers": "k:9093", "security": security},
            "inputs": [{"paths": [str(tmp_path / "logs" / "*.log")], "module": "portal"}],
        }
    )
    assert agent.kafka.security == consumer.security
    assert agent.kafka.security.client_kwargs()["sasl_plain_password"] == "s3cret-pw"


@pytest.mark.parametrize(
    ("logged", "says"),
    [
        (
            "Connection lost: [Error 58] SaslAuthenticationFailedError: Authentication failed during "
            "authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512",
            "login refused: wrong user name or password",
        ),
        (
            "Connection lost: KafkaConnectionError: Handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] "
            "certificate verify failed: unable to get local issuer certificate (_ssl.c:1006)",
            "not signed by kafka.security.cafile's CA",
        ),
        (
            "Connection lost: KafkaConnectionError: Handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] "
            "certificate verify failed: Hostname mismatch, certificate is not valid for 'localhost'.",
            "does not name the host",
        ),
        ("Connection failed: KafkaConnectionError: 111 ECONNREFUSED", "not reachable"),
    ],
)
def test_a_failed_connection_is_explained_from_kafka_pythons_log(logged, says):
    """kafka-python raises only "Unable to bootstrap"; the reason is in its log, at any depth."""
    import logging

    from keplerlog.kafkaauth import watch_connection_problems

    problems = watch_connection_problems()
    assert watch_connection_problems() is problems  # once per process
    problems.last = None
    logging.getLogger("kafka.net.connection").error("<KafkaConnection node_id=bootstrap-0>: %s", logged)
    text = problems.explain(TimeoutError("Unable to bootstrap from localhost:9092"))
    assert says in text, text
    assert logged.split(": ", 1)[1][:60] in text  # the raw cause is kept


def test_a_refused_login_is_not_hidden_by_the_disconnects_that_follow():
    import logging

    from keplerlog.kafkaauth import watch_connection_problems

    problems = watch_connection_problems()
    problems.last = None
    logger = logging.getLogger("kafka.net.connection")
    logger.error("<c>: Connection lost: [Error 58] SaslAuthenticationFailedError: Authentication failed")
    logger.error("<c>: Connection lost: KafkaConnectionError: socket disconnected")
    assert "login refused" in problems.explain(TimeoutError("Unable to bootstrap"))
    problems.last = None
    logger.error("<c>: Connection lost: KafkaConnectionError: socket disconnected")
    assert problems.explain(TimeoutError("x")).startswith("not reachable")
