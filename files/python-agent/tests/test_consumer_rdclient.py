"""consumer/rdclient.py: its settings, its connect error, its config key, its poll's wait."""

import time
from dataclasses import replace

import pytest

from keplerlog.confkit import ConfigError
from keplerlog.consumer.config import load_config
from keplerlog.consumer.rdclient import ConnectError, RdConsumer, rdkafka_conf
from keplerlog.kafkaauth import KafkaSecurity
from keplerlog.record import Batch
from keplerlog.testing.consumer import consumer_config
from keplerlog.testing.kafka_node import free_port

ENV = {"KEPLERLOG_BOOTSTRAP_SERVERS": "k1:9092, k2:9092", "KEPLERLOG_ROOT": "/srv/kl"}


def test_the_settings_are_the_consumers_own_with_a_bounded_prefetch(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    cfg = replace(
        load_config(None, ENV),
        group_instance_id="c1",
        batch_max_bytes=96 << 20,
        security=KafkaSecurity(
            protocol="sasl_ssl", cafile=str(ca), username="u", password="p", check_hostname=False
        ),
    )
    conf = rdkafka_conf(cfg, print, print)
    assert conf["bootstrap.servers"] == "k1:9092,k2:9092"
    assert conf["enable.auto.commit"] is False  # offsets only after fsync, by the app
    assert conf["group.instance.id"] == "c1"
    assert conf["queued.max.messages.kbytes"] == 2 * 96 * 1024  # two batches fetched ahead
    assert conf["fetch.queue.backoff.ms"] == 10  # not librdkafka's 1 s pause once it is full
    huge = rdkafka_conf(replace(cfg, batch_max_bytes=1 << 40), print, print)
    assert huge["queued.max.messages.kbytes"] == 2_097_151  # librdkafka's largest
    assert conf["fetch.wait.max.ms"] == cfg.fetch_max_wait_ms
    assert conf["security.protocol"] == "sasl_ssl" and conf["ssl.ca.location"] == str(ca)
    assert conf["ssl.endpoint.identification.algorithm"] == "none"
    assert (conf["sasl.mechanism"], conf["sasl.username"], conf["sasl.password"]) == (
        "SCRAM-SHA-512",
        "u",
        "p",
    )
    assert "group.instance.id" not in rdkafka_conf(replace(cfg, group_instance_id=None), print, print)


def test_no_cluster_at_the_address_is_an_error_that_says_so_in_time():
    """librdkafka retries for ever in the background: the app's connect loop needs an error."""
    cfg = replace(load_config(None, ENV), bootstrap_servers=f"127.0.0.1:{free_port()}", client="librdkafka")
    start = time.monotonic()
    with pytest.raises(ConnectError) as caught:
        RdConsumer(cfg, bootstrap_timeout_s=1.0)
    assert time.monotonic() - start < 10
    assert caught.value.explained.startswith("not reachable")


def test_the_client_is_chosen_in_the_config_and_a_wrong_one_is_named(tmp_path):
    path = tmp_path / "consumer.yml"
    assert load_config(None, ENV).client == "kafka-python"
    path.write_text("kafka:\n  client: librdkafka\n")
    assert load_config(str(path), ENV).client == "librdkafka"
    path.write_text("kafka:\n  client: libkafka\n")
    with pytest.raises(ConfigError, match=r"kafka\.client"):
        load_config(str(path), ENV)


@pytest.mark.kafka
def test_a_poll_returns_with_the_first_record_not_at_its_timeout(kafka, topic, tmp_path):
    """consume(n, timeout) waits for n records or the whole timeout: every poll of a batch took
    its full time at a trickle. The poll must come back as soon as a record is there."""
    from kafka import KafkaProducer

    def send(offset: int, value: bytes) -> None:
        b = Batch("shop", "portal", "h1", "/app/portal.log", "f1", offset, 1, int(time.time() * 1000))
        producer.send(topic, value, key=b.key(), headers=b.headers()).get(timeout=30)

    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    consumer = RdConsumer(replace(consumer_config(kafka.bootstrap, topic, tmp_path), client="librdkafka"))
    try:
        consumer.subscribe([topic])
        send(0, b"warm\n")
        deadline = time.monotonic() + 60
        while not consumer.poll(timeout_ms=1000):  # joined the group, read the first record
            assert time.monotonic() < deadline, "never got the first record"
        send(5, b"next\n")
        start = time.monotonic()
        got = consumer.poll(timeout_ms=20_000)
        took = time.monotonic() - start
        assert [r.value for recs in got.values() for r in recs] == [b"next\n"]
        assert took < 10, f"poll took {took:.1f} s of its 20 s timeout"
    finally:
        consumer.close()
        producer.close()
