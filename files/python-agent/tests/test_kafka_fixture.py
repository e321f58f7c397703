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


def test_a_created_topic_counts_as_ready_only_with_a_leader_for_every_partition():
    """create_topic waits for this: a broker that does not know the topic yet answers with an
    error code, or with partitions that have no leader (-1)."""
    from keplerlog.testing.kafka_node import _has_leaders

    def described(error=0, leaders=(0, 0, 0, 0)):
        return [{"error_code": error, "partitions": [{"leader_id": x} for x in leaders]}]

    assert _has_leaders(described(), 4)
    assert not _has_leaders(described(error=3), 4)  # UNKNOWN_TOPIC_OR_PARTITION
    assert not _has_leaders(described(leaders=(0, -1, 0, 0)), 4)
    assert not _has_leaders(described(leaders=(0, 0)), 4)  # not every partition yet
    assert not _has_leaders([], 4)
