"""Agent and consumer against a secure Kafka (SASL_SSL, SCRAM-SHA-512, StandardAuthorizer).

What the roles deploy, at the process level: each one works with its own user and nothing but
its ACLs, and a wrong password or an unknown CA gives a log line that says so (kafka-python
itself only raises "Unable to bootstrap"), while the process waits and retries without
hammering the broker instead of exiting into a restart loop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from agent_support import AgentProcess, TopicReader, append, lines, write_config

from keplerlog.record import Batch
from keplerlog.testing.kafka_node import KafkaCluster
from keplerlog.testing.pki import make_pki

AGENT, AGENT_PW = "keplerlog-agent", "agent-" + uuid.uuid4().hex
CONSUMER, CONSUMER_PW = "keplerlog-consumer", "consumer-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    cluster = KafkaCluster(tmp_path_factory.mktemp("secure-kafka"), size=1, secure=True)
    cluster.start()
    cluster.add_user(AGENT, AGENT_PW)
    cluster.add_user(CONSUMER, CONSUMER_PW)
    yield cluster
    cluster.destroy()


@pytest.fixture
def secure_topic(secure: KafkaCluster) -> str:
    name = f"s-{uuid.uuid4().hex[:10]}"
    secure.create_topic(name, partitions=2, replication=1)
    secure.allow(AGENT, "WRITE", "TOPIC", name)
    secure.allow(CONSUMER, "READ", "TOPIC", name)
    secure.allow(CONSUMER, "READ", "GROUP", f"g-{name}")
    return name


def password_file(tmp: Path, password: str) -> Path:
    path = tmp / f"pw-{uuid.uuid4().hex[:6]}"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def security(tmp: Path, secure: KafkaCluster, user: str, password: str, cafile: Path | None = None) -> dict:
    assert secure.pki is not None
    return {
        "protocol": "sasl_ssl",
        "cafile": str(cafile or secure.pki.ca),
        "username": user,
        "password_file": str(password_file(tmp, password)),
    }


def start_agent(
    tmp: Path,
    secure: KafkaCluster,
    topic: str,
    password: str,
    cafile: Path | None = None,
    client: str = "kafka-python",
):
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    cfg = write_config(tmp, secure.bootstrap, topic, [str(logs / "*.log")], client)
    doc = yaml.safe_load(cfg.read_text())
    doc["kafka"]["security"] = security(tmp, secure, AGENT, password, cafile)
    cfg.write_text(yaml.safe_dump(doc))
    return logs, AgentProcess(cfg, tmp / "agent.out").start()


def wait_for_text(proc: AgentProcess, text: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = proc.output()
        if text in out:
            return out
        assert proc.proc is not None and proc.proc.poll() is None, f"agent exited:\n{out[-2000:]}"
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not logged within {timeout} s:\n{proc.output()[-3000:]}")


def test_the_agent_ships_with_its_user_and_write_only_rights(tmp_path, secure, secure_topic, client):
    logs, agent = start_agent(tmp_path, secure, secure_topic, AGENT_PW, client=client)
    reader = TopicReader(secure.admin_bootstrap, secure_topic)  # the fixture's super user reads back
    try:
        data = lines("tls", 200)
        append(logs / "app.log", data)
        reader.wait_contents({str(logs / "app.log"): [data]}, timeout=60)
        assert "login refused" not in agent.output()
    finally:
        reader.close()
        assert agent.stop() == 0


# each client's own words for the cause, kept next to the explanation
RAW = {
    ("wrong password", "kafka-python"): "Authentication failed",
    ("wrong password", "librdkafka"): "Authentication failed",
    ("another CA", "kafka-python"): "CERTIFICATE_VERIFY_FAILED",
    ("another CA", "librdkafka"): "certificate verify failed",
}


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("wrong password", "login refused: wrong user name or password"),
        ("another CA", "not signed by kafka.security.cafile's CA"),
    ],
)
def test_the_agent_says_why_it_cannot_connect_and_keeps_waiting(
    tmp_path, secure, secure_topic, case, says, client
):
    cafile = make_pki(tmp_path / "other-ca").ca if case == "another CA" else None
    password = "not-" + AGENT_PW if case == "wrong password" else AGENT_PW
    logs, agent = start_agent(tmp_path, secure, secure_topic, password, cafile, client)
    try:
        append(logs / "app.log", lines("waiting", 10))
        out = wait_for_text(agent, says)
        assert RAW[case, client] in out
        time.sleep(15)  # it waits and tries again; it neither exits nor hammers the broker
        assert agent.proc is not None and agent.proc.poll() is None
        tries = agent.output().count(says)
        assert 2 <= tries <= 8, f"{tries} attempts in ~20 s"
    finally:
        assert agent.stop() == 0


def run_consumer(
    tmp: Path, secure: KafkaCluster, topic: str, password: str, client: str
) -> tuple[subprocess.Popen, Path]:
    cfg = tmp / "consumer.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "kafka": {
                    "bootstrap_servers": secure.bootstrap,
                    "topic": topic,
                    "group_id": f"g-{topic}",
                    "client": client,
                    "security": security(tmp, secure, CONSUMER, password),
                },
                "root": str(tmp / "central"),
                "metrics": {"port": 0},
            }
        )
    )
    out = tmp / "consumer.out"
    with out.open("ab") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "keplerlog.consumer.main", "--config", str(cfg)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return proc, out


def test_the_consumer_reads_with_its_user_and_says_why_when_it_cannot(tmp_path, secure, secure_topic, client):
    from kafka import KafkaProducer

    (tmp_path / "wrong").mkdir()
    wrong, wrong_out = run_consumer(tmp_path / "wrong", secure, secure_topic, "not-" + CONSUMER_PW, client)
    right, _ = run_consumer(tmp_path, secure, secure_topic, CONSUMER_PW, client)
    try:
        producer = KafkaProducer(bootstrap_servers=secure.bootstrap, **secure.client_kwargs(AGENT, AGENT_PW))
        value = b"2026-12-03 12:00:00 one line over TLS\n"
        batch = Batch(
            service="shop",
            module="portal",
            host="h",
            path="/app/portal/logs/app.log",
            file_id="f1",
            offset=0,
            lines=1,
            ts_ms=int(time.time() * 1000),
        )
        producer.send(secure_topic, value=value, key=batch.key(), headers=batch.headers()).get(timeout=30)
        producer.close()
        day = time.strftime("%Y%m%d", time.gmtime())
        target = tmp_path / "central" / "shop" / f"portal.{day}"
        deadline = time.monotonic() + 60
        while not (target.exists() and target.read_bytes() == value):
            assert time.monotonic() < deadline, f"{target} never got the line"
            time.sleep(0.5)
        # the one with the wrong password: alive, waiting, and its log says why (the client's
        # own words: the consumer keeps its WARNINGs), with growing pauses between attempts
        deadline = time.monotonic() + 60
        says = (
            "Authentication failed"
            if client == "kafka-python"
            else "login refused: wrong user name or password"
        )
        while says not in wrong_out.read_text(errors="replace"):
            assert wrong.poll() is None, wrong_out.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, wrong_out.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        time.sleep(10)
        assert wrong.poll() is None, wrong_out.read_text(errors="replace")[-2000:]
        text = wrong_out.read_text(errors="replace")
        if client == "kafka-python":
            attempts = text.count("Bootstrap connection to")
            assert attempts <= 30, f"{attempts} connection attempts: hammering the broker"
        else:  # one consumer made (and given up after 5 s) per attempt, 5 s, 10 s, ... apart
            attempts = text.count("next try in")
            assert 1 <= attempts <= 4, f"{attempts} attempts in ~20 s\n{text[-2000:]}"
        assert not (tmp_path / "wrong" / "central" / "shop").exists()
    finally:
        for proc in (right, wrong):
            proc.send_signal(signal.SIGTERM)
        assert right.wait(30) == 0
        assert wrong.wait(30) == 0
