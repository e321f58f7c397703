"""Cluster-wide checks, run from kl-kafka-1 with the other nodes reached by name."""

import re
import time
import uuid

from conftest import BOOTSTRAP, CA, CLIENT_BOOTSTRAP, NODES, TOPIC, kafka_tool, run_python, secret

testinfra_hosts = ["kl-kafka-1"]

# The agents' identity produces, the consumer's reads (each can do only that, see test_security).
PRODUCE_CONSUME = r"""
import os, sys, time
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
bootstrap, topic, token, partitions = sys.argv[1].split(","), sys.argv[2], sys.argv[3], int(sys.argv[4])
def auth(user):
    return dict(security_protocol="SASL_SSL", ssl_cafile=os.environ["CA"], sasl_mechanism="SCRAM-SHA-512",
                sasl_plain_username=user, sasl_plain_password=os.environ[user.replace("-", "_").upper()])
producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", retries=10, request_timeout_ms=20000,
                         **auth("keplerlog-agent"))
for p in range(partitions):
    meta = producer.send(topic, value=f"{token}-{p}".encode(), partition=p).get(timeout=60)
    print(f"produced partition={meta.partition} offset={meta.offset}")
producer.close()
consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=2000,
                         **auth("keplerlog-consumer"))
tps = [TopicPartition(topic, p) for p in range(partitions)]
consumer.assign(tps)
consumer.seek_to_beginning()
wanted = {f"{token}-{p}" for p in range(partitions)}
deadline = time.time() + 60
while wanted and time.time() < deadline:
    for record in consumer:
        value = record.value.decode()
        if value in wanted and value == f"{token}-{record.partition}":
            wanted.discard(value)
            print(f"consumed partition={record.partition} offset={record.offset}")
consumer.close()
print("missing:", sorted(wanted))
sys.exit(1 if wanted else 0)
"""


def test_quorum_has_three_voters(host):
    out = kafka_tool(
        host,
        "org.apache.kafka.tools.MetadataQuorumCommand",
        f"--bootstrap-server {BOOTSTRAP} describe --status",
    ).stdout
    voters = [line for line in out.splitlines() if line.startswith("CurrentVoters:")]
    assert voters, out
    assert sorted(int(i) for i in re.findall(r'"id":\s*(\d+)', voters[0])) == [1, 2, 3], out
    assert re.search(r"LeaderId:\s+[123]\b", out), out


def test_topic_layout_and_configs(host):
    out = kafka_tool(
        host,
        "org.apache.kafka.tools.TopicCommand",
        f"--bootstrap-server {BOOTSTRAP} --describe --topic {TOPIC}",
    ).stdout
    assert re.search(r"PartitionCount:\s*4\b", out), out
    assert re.search(r"ReplicationFactor:\s*2\b", out), out
    assert "min.insync.replicas=1" in out
    assert "unclean.leader.election.enable=false" in out
    assert "retention.ms=86400000" in out
    replica_sets = re.findall(r"Replicas:\s*([\d,]+)", out)
    assert len(replica_sets) == 4 and all(len(r.split(",")) == 2 for r in replica_sets), out


def client_env():
    return {
        "CA": CA,
        "KEPLERLOG_AGENT": secret("keplerlog-agent"),
        "KEPLERLOG_CONSUMER": secret("keplerlog-consumer"),
    }


def test_produce_on_one_node_consume_on_another(host, nodes):
    token = f"hello-{uuid.uuid4().hex}"
    producer = nodes["kl-kafka-1"].run(
        f"echo {token} | KAFKA_HEAP_OPTS=-Xmx128m /usr/local/bin/kafka-class org.apache.kafka.tools.ConsoleProducer "
        f"--bootstrap-server kl-kafka-1:9094 --topic {TOPIC} --producer-property acks=all "
        f"--command-config /etc/kafka/admin-client.properties"
    )
    assert producer.rc == 0, producer.stderr
    consumer = kafka_tool(
        nodes["kl-kafka-2"],
        "org.apache.kafka.tools.consumer.ConsoleConsumer",
        f"--bootstrap-server kl-kafka-2:9094 --topic {TOPIC} --from-beginning "
        f"--timeout-ms 30000 --max-messages 100000",
        check=False,
    )
    assert token in consumer.stdout, consumer.stderr


def wait_in_sync(host, timeout=180):
    deadline = time.time() + timeout
    out = None
    while time.time() < deadline:
        out = kafka_tool(
            host,
            "org.apache.kafka.tools.TopicCommand",
            f"--bootstrap-server {BOOTSTRAP} --describe --under-replicated-partitions",
            check=False,
        )
        if out.rc == 0 and not out.stdout.strip():
            return
        time.sleep(5)
    raise AssertionError(f"partitions still under-replicated: {out.stdout if out else ''}")


def leaders(host) -> dict[int, int]:
    """Partition -> leader broker id of the log topic."""
    out = kafka_tool(
        host,
        "org.apache.kafka.tools.TopicCommand",
        f"--bootstrap-server {BOOTSTRAP} --describe --topic {TOPIC}",
    ).stdout
    return {int(p): int(b) for p, b in re.findall(r"Partition:\s*(\d+)\s+Leader:\s*(-?\d+)", out)}


def test_every_partition_served_with_one_broker_down(host, nodes):
    # stop a broker that leads at least one partition (else the fault proves nothing)
    before = leaders(host)
    assert len(before) == 4, before
    victim = next(n for n in NODES[::-1] if int(n.rsplit("-", 1)[1]) in before.values())
    down = nodes[victim]
    bootstrap = ",".join(f"{n}:9092" for n in NODES if n != victim)
    assert bootstrap != CLIENT_BOOTSTRAP
    down.run("systemctl stop kafka")
    try:
        assert not down.service("kafka").is_running
        victim_id = int(victim.rsplit("-", 1)[1])
        deadline = time.monotonic() + 60
        while victim_id in (now := leaders(host)).values():  # its partitions moved to a follower
            assert time.monotonic() < deadline, f"leaders still on {victim}: {now}"
            time.sleep(2)
        token = f"degraded-{uuid.uuid4().hex}"
        result = run_python(host, PRODUCE_CONSUME, bootstrap, TOPIC, token, "4", env=client_env())
        assert result.rc == 0, f"{result.stdout}\n{result.stderr}"
        assert result.stdout.count("consumed partition=") == 4, result.stdout
    finally:
        down.run("systemctl start kafka")
    assert down.service("kafka").is_running
    wait_in_sync(host)
