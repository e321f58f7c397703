"""Kafka's own health in Prometheus: the JMX exporter java agent on every node (port 9404).

The names checked are the ones kepler-log's alert rules and dashboard use; a rule naming a
metric the exporter does not produce is caught here and, against a live Prometheus, by the
end-to-end scenario.
"""

import time

from conftest import BOOTSTRAP, NODES, TOPIC, kafka_tool, run_python

testinfra_hosts = ["kl-kafka-1"]

SCRAPE = r"""
import sys, urllib.request
for node in sys.argv[1:]:
    text = urllib.request.urlopen(f"http://{node}:9404/metrics", timeout=20).read().decode()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            print(node, line)
"""


def scrape(host) -> dict[str, dict[str, float]]:
    """Each node's samples: {node: {'name{labels}': value}}."""
    out: dict[str, dict[str, float]] = {n: {} for n in NODES}
    result = run_python(host, SCRAPE, *NODES, python="/usr/bin/python3")
    assert result.rc == 0, result.stderr
    for line in result.stdout.splitlines():
        node, sample = line.split(" ", 1)
        name, value = sample.rsplit(" ", 1)
        out[node][name] = float(value)
    return out


def named(samples: dict[str, float], name: str) -> dict[str, float]:
    return {k: v for k, v in samples.items() if k == name or k.startswith(name + "{")}


def test_every_node_exports_the_health_metrics_the_rules_use(host):
    # A broker makes a request type's meter at its first such request. The broker that
    # test_cluster.py stopped and started again leads no partition and may have served no request
    # yet (its followers fetch from others, clients bootstrap elsewhere): one CI run found no
    # requests_total on it. ApiVersions to every broker gives each one a request to count.
    kafka_tool(host, "org.apache.kafka.tools.BrokerApiVersionsCommand", f"--bootstrap-server {BOOTSTRAP}")
    deadline = time.time() + 120
    while True:  # the side effect's rolling restart may still be catching replicas up
        by_node = scrape(host)
        under = {
            n: named(s, "kafka_server_replicamanager_underreplicatedpartitions") for n, s in by_node.items()
        }
        served = all(named(s, "kafka_network_requestmetrics_requests_total") for s in by_node.values())
        if (served and all(v and sum(v.values()) == 0 for v in under.values())) or time.time() > deadline:
            break
        time.sleep(5)
    for node, samples in by_node.items():
        for name in (
            "kafka_server_replicamanager_underreplicatedpartitions",
            "kafka_server_replicamanager_partitioncount",
            "kafka_server_replicamanager_leadercount",
            "kafka_server_replicamanager_isrshrinks_total",
            "kafka_server_replicamanager_isrexpands_total",
            "kafka_controller_kafkacontroller_activecontrollercount",
            "kafka_controller_kafkacontroller_offlinepartitionscount",
            "kafka_network_requestmetrics_requests_total",
            "jvm_memory_used_bytes",
        ):
            assert named(samples, name), f"{node} does not export {name}"
        assert sum(named(samples, "kafka_server_replicamanager_underreplicatedpartitions").values()) == 0, (
            node
        )
        assert sum(named(samples, "kafka_server_replicamanager_partitioncount").values()) > 0, node
        assert sum(named(samples, "kafka_controller_kafkacontroller_offlinepartitionscount").values()) == 0, (
            node
        )
    active = sum(
        sum(named(s, "kafka_controller_kafkacontroller_activecontrollercount").values())
        for s in by_node.values()
    )
    assert active == 1, f"{active} active controllers"


def test_topic_traffic_is_counted_per_topic(host):
    by_node = scrape(host)
    topic_in = [
        v
        for s in by_node.values()
        for k, v in named(s, "kafka_server_brokertopicmetrics_bytesin_total").items()
        if f'topic="{TOPIC}"' in k
    ]
    assert topic_in and sum(topic_in) > 0, "no bytes in counted for the log topic"
    produce = [
        v
        for s in by_node.values()
        for k, v in named(s, "kafka_network_requestmetrics_requests_total").items()
        if 'request="Produce"' in k
    ]
    assert produce and sum(produce) > 0
