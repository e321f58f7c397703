import pytest
from kafka import KafkaConsumer, KafkaProducer

pytestmark = pytest.mark.kafka


def test_fixture_broker_round_trip(kafka, topic):
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    producer.send(topic, b"ping", headers=[("kl.v", b"1")]).get(timeout=30)
    producer.close()
    consumer = KafkaConsumer(
        topic, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=20000
    )
    got = []
    for m in consumer:
        got.append((m.value, m.headers))
        break
    consumer.close()
    assert got == [(b"ping", [("kl.v", b"1")])]
