"""The producer clients (`kafka.client`) without a broker: their settings and signals.

What they do against real brokers (outage, rebuilt cluster, TLS + SCRAM, drain, kill -9) is
tested by the real-Kafka agent tests, which run once per client (the `client` fixture).
"""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest

from keplerlog.agent import rdsender
from keplerlog.agent.config import ConfigError, parse
from keplerlog.agent.sender import Sender, make_sender

BASE = {
    "service": "shop",
    "state_file": "/var/lib/keplerlog/state.json",
    "inputs": [{"paths": ["/app/logs/*.log"]}],
}


def _cfg(**kafka):
    return parse({**BASE, "kafka": kafka}, env={})


def test_the_client_is_kafka_python_unless_chosen_and_an_unknown_one_is_refused():
    assert _cfg().kafka.client == "kafka-python"
    assert isinstance(make_sender(_cfg(), lambda: None), Sender)
    assert isinstance(make_sender(_cfg(client="librdkafka"), lambda: None), rdsender.RdSender)
    with pytest.raises(ConfigError, match=r"kafka\.client"):
        _cfg(client="rdkafka")


def test_librdkafka_without_confluent_kafka_installed_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "confluent_kafka" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"confluent-kafka.*keplerlog\[librdkafka\]"):
        _cfg(client="librdkafka")


def test_settings_keep_the_agents_guarantees_and_cap_librdkafkas_queue():
    cfg = _cfg(client="librdkafka", max_record_bytes=100_000, linger_ms=7, compression="zstd")
    conf = rdsender.client_config(cfg, lambda _e: None)
    assert conf["acks"] == "all" and conf["enable.idempotence"] is True
    assert conf["message.timeout.ms"] == 0  # never expire: an outage of any length ends delivered
    assert conf["max.in.flight.requests.per.connection"] <= 5  # idempotence keeps order up to 5
    assert conf["linger.ms"] == 7 and conf["compression.type"] == "zstd"
    # Nagle off as kafka-python has it: else a trickle's requests wait on delayed ACKs
    assert conf["socket.nagle.disable"] is True
    # a batch can always be sent: never larger than a request may be
    assert conf["batch.size"] <= conf["message.max.bytes"]
    assert conf["message.max.bytes"] >= cfg.kafka.max_record_bytes
    # librdkafka's queue holds what the agent may have in flight, and not 1 GiB (its default)
    cap = conf["queue.buffering.max.kbytes"] * 1024
    assert cfg.limits.max_buffer_bytes + cfg.kafka.max_record_bytes <= cap <= 64 * 1024 * 1024
    assert conf["security.protocol"] == "plaintext" and "sasl.password" not in conf


def test_linger_0_sends_each_record_at_once_as_batches_of_one_and_only_for_records_of_many_lines():
    """kafka.linger_ms 0 becomes one record per batch and a long linger (rdsender.IDLE_WAKEUP_MS:
    what a blocked broker thread sleeps, not what a record waits); any other linger, and every
    one_line_per_record config, keeps librdkafka's batching of queued records."""
    default = rdsender.client_config(_cfg(client="librdkafka"), lambda _e: None)
    assert default["batch.num.messages"] == 1 and default["linger.ms"] == rdsender.IDLE_WAKEUP_MS
    zero = rdsender.client_config(_cfg(client="librdkafka", linger_ms=0), lambda _e: None)
    assert zero["batch.num.messages"] == 1 and zero["linger.ms"] == rdsender.IDLE_WAKEUP_MS
    some = rdsender.client_config(_cfg(client="librdkafka", linger_ms=3), lambda _e: None)
    assert "batch.num.messages" not in some and some["linger.ms"] == 3
    for kafka in ({"client": "librdkafka"}, {"client": "librdkafka", "linger_ms": 0}):
        one_line = parse(
            {**BASE, "kafka": kafka, "inputs": [{"paths": ["/app/logs/*.log"], "one_line_per_record": True}]},
            env={},
        )
        conf = rdsender.client_config(one_line, lambda _e: None)
        assert "batch.num.messages" not in conf and conf["linger.ms"] == one_line.kafka.linger_ms


def test_tls_and_scram_settings(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    security = {
        "protocol": "sasl_ssl",
        "cafile": str(ca),
        "check_hostname": False,
        "username": "agent",
        "password_file": str(pw),
    }
    conf = rdsender.client_config(_cfg(client="librdkafka", security=security), lambda _e: None)
    assert conf["security.protocol"] == "sasl_ssl"
    assert conf["ssl.ca.location"] == str(ca)
    assert conf["ssl.endpoint.identification.algorithm"] == "none"
    assert (conf["sasl.mechanism"], conf["sasl.username"], conf["sasl.password"]) == (
        "SCRAM-SHA-512",
        "agent",
        "s3cret",
    )


def test_a_replaced_cluster_in_librdkafkas_log_breaks_the_producer_and_wakes_the_loop(caplog):
    wakes = []
    sender = rdsender.RdSender(_cfg(client="librdkafka"), lambda: wakes.append(1))
    bridge = rdsender._LogBridge(sender._cluster_changed)
    with caplog.at_level(logging.DEBUG, logger="kafka.librdkafka"):
        bridge.log(logging.WARNING, "%s [%s] %s", "FAIL", "p#1", "Connect failed: Connection refused")
        assert not sender.broken and not wakes
        bridge.log(logging.WARNING, "%s [%s] %s", "CLUSTERID", "p#1", 'reports different ClusterId "b"')
    assert sender.broken and wakes == [1]
    assert "another Kafka cluster" in sender.broken_reason
    assert any("CLUSTERID" in r.getMessage() for r in caplog.records)  # still in librdkafka's log


def test_a_fatal_error_raised_out_of_poll_breaks_the_producer_and_the_poll_thread_goes_on():
    """confluent-kafka raised OUT_OF_ORDER_SEQUENCE_NUMBER (fatal) out of poll(): the poll thread
    died, the producer was never marked broken and so never renewed (every send _FATAL)."""
    import confluent_kafka as ck  # installed with the librdkafka extra, as in CI

    wakes = []
    sender = rdsender.RdSender(_cfg(client="librdkafka"), lambda: wakes.append(1))
    polls = []

    class Producer:
        def poll(self, timeout):
            polls.append(timeout)
            if len(polls) == 1:
                raise ck.KafkaException(
                    ck.KafkaError(ck.KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "desync", fatal=True)
                )
            if len(polls) == 2:
                raise ck.KafkaException(ck.KafkaError(ck.KafkaError._TRANSPORT, "a hiccup"))
            if len(polls) >= 4:
                sender._stop.set()

    sender._poll_loop(Producer())
    assert len(polls) == 4  # went on polling after both
    assert sender.broken and "OUT_OF_ORDER_SEQUENCE_NUMBER" in sender.broken_reason and wakes


def test_broker_connected_reads_the_brokers_state_from_the_statistics():
    sender = rdsender.RdSender(_cfg(client="librdkafka"), lambda: None)
    assert not sender.broker_connected  # no producer
    sender._producer = object()

    def stats(*states: tuple[int, str]) -> str:
        brokers = {f"b{i}": {"nodeid": node, "state": state} for i, (node, state) in enumerate(states)}
        return json.dumps({"brokers": brokers})

    sender._stats_cb(stats((-1, "UP"), (1, "DOWN"), (2, "CONNECT")))  # only the bootstrap entry
    assert not sender.broker_connected
    sender._stats_cb(stats((-1, "INIT"), (1, "DOWN"), (2, "UP")))
    assert sender.broker_connected


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("SASL authentication error: Authentication failed during authentication", "login refused"),
        (
            "sasl_ssl://127.0.0.1:1/bootstrap: SSL handshake failed: error:0A000086:SSL routines::"
            "certificate verify failed: broker certificate could not be verified",
            "not signed by kafka.security.cafile's CA",
        ),
        ("Connect to ipv4#127.0.0.1:1 failed: Connection refused", "not reachable"),
    ],
)
def test_connection_problems_are_put_in_the_same_words_as_with_kafka_python(raw, says):
    text = rdsender.explain(raw)
    assert says in text and raw in text


def test_kafka_pythons_fatal_state_is_read_with_its_reason():
    """The kafka-python sender's `broken` and `broken_reason` against kafka-python's own
    TransactionManager (a property misread as a method crashed the agent at the renewal)."""
    from kafka.errors import MessageSizeTooLargeError
    from kafka.producer.transaction_manager import TransactionManager

    class Producer:
        _transaction_manager = TransactionManager()

    sender = Sender(_cfg(), lambda: None)
    sender._producer = Producer()
    assert not sender.broken
    Producer._transaction_manager.transition_to_fatal_error(MessageSizeTooLargeError("too large"))
    assert sender.broken
    assert "too large" in sender.broken_reason


def test_past_librdkafkas_queue_cap_a_send_fails_at_once_and_every_accepted_record_is_reported():
    """No broker answers, so nothing leaves librdkafka's queue: sends go past its cap. The one
    past it must raise at once (the ledger then backs off and re-reads, as for any failed send),
    the cap must have held, and closing must report every accepted record (as failed, to be
    re-read), none left without an outcome."""
    from confluent_kafka import Producer

    raw = {
        **BASE,
        "kafka": {"client": "librdkafka", "bootstrap_servers": "127.0.0.1:1", "max_record_bytes": 65536},
        "limits": {"max_buffer_bytes": 65536},
    }
    cfg = parse(raw, env={})
    sender = rdsender.RdSender(cfg, lambda: None)
    conf = rdsender.client_config(cfg, sender._problem)
    cap = conf["queue.buffering.max.kbytes"] * 1024
    sender._producer = Producer(conf)  # as connect() leaves it, minus the broker
    value = b"x" * 65536
    accepted = 0
    with pytest.raises(BufferError):
        for i in range(2 * cap // len(value)):
            sender.send(value, b"k", [], i)
            accepted += 1
    assert (cap // len(value)) // 2 <= accepted and accepted * len(value) <= cap
    sender.close()
    outcomes = []
    while not sender.results.empty():
        outcomes.append(sender.results.get_nowait())
    assert sorted(o.token for o in outcomes) == list(range(accepted))
    assert all(o.error is not None for o in outcomes)


def test_ask_cluster_uses_cluster_id_and_falls_back_to_list_topics_on_older_releases():
    """cluster_id (confluent-kafka 2.16+) answers with a string; list_topics, on older releases,
    imports confluent_kafka.admin (the package's whole init) for its answer's classes."""
    import confluent_kafka as ck

    asked = []

    class New:
        def cluster_id(self, timeout):
            asked.append(("cluster_id", timeout))
            return "abc"

        def list_topics(self, timeout):  # pragma: no cover - must not be used
            asked.append(("list_topics", timeout))

    class Old:
        def list_topics(self, timeout):
            asked.append(("list_topics", timeout))
            raise ck.KafkaException(ck.KafkaError(ck.KafkaError._TRANSPORT, "down"))

    rdsender.ask_cluster(New(), 2.5)
    with pytest.raises(ck.KafkaException):  # no answer: raised as before, connect() reports it
        rdsender.ask_cluster(Old(), 1.0)
    assert asked == [("cluster_id", 2.5), ("list_topics", 1.0)]


def test_the_installed_confluent_kafka_asks_the_cluster_without_its_admin_module():
    """A new enough confluent-kafka (as the image installs) has cluster_id: a timeout against no
    broker raises the KafkaException connect() catches, and confluent_kafka.admin stays unloaded
    in a fresh interpreter."""
    code = (
        "import sys\n"
        "from keplerlog import lazyinit\n"
        "lazyinit.defer_package_init('confluent_kafka')\n"
        "from confluent_kafka.cimpl import KafkaException, Producer\n"
        "from keplerlog.agent.rdsender import ask_cluster\n"
        "p = Producer({'bootstrap.servers': '127.0.0.1:1', 'log_level': 0})\n"
        "try:\n"
        "    ask_cluster(p, 0.5)\n"
        "except KafkaException:\n"
        "    print('timed out', hasattr(p, 'cluster_id'), 'confluent_kafka.admin' in sys.modules)\n"
    )
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "timed out True False", done.stdout + done.stderr
