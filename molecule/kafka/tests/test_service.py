"""Every node: Kafka installed, running and enabled under systemd."""

import os

import testinfra.utils.ansible_runner

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ.get("MOLECULE_INVENTORY_FILE")
    or os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "inventory")
).get_hosts("kafka")


def test_service_running_and_enabled(host):
    service = host.service("kafka")
    assert service.is_running
    assert service.is_enabled


def test_listeners(host):
    assert host.socket("tcp://0.0.0.0:9092").is_listening  # clients: SASL_SSL
    assert host.socket("tcp://0.0.0.0:9093").is_listening  # KRaft controller: TLS
    assert host.socket("tcp://0.0.0.0:9094").is_listening  # inter-broker: TLS


def test_tls_files_are_not_world_readable(host):
    for name in ("node.key", "keystore.pem"):
        f = host.file(f"/etc/kafka/tls/{name}")
        assert f.exists and f.user == "root" and f.group == "kafka", name
        assert f.mode & 0o007 == 0, f"{name} mode {f.mode:o}"
    assert host.file("/etc/kafka/server.properties").mode & 0o007 == 0
    assert host.file("/etc/kafka/tls").mode & 0o007 == 0
    # the node's key is PKCS#8 (what Kafka's PEM key store reads) and was made on the node
    assert host.file("/etc/kafka/tls/node.key").content_string.startswith("-----BEGIN PRIVATE KEY-----")


def test_storage_formatted_once_with_node_id(host):
    meta = host.file("/var/lib/kafka/data/meta.properties")
    assert meta.exists
    assert meta.user == "kafka"
    node_id = host.ansible.get_variables()["kafka_node_id"]
    assert f"node.id={node_id}" in meta.content_string
    # one cluster: every node was formatted with the same cluster id (a second format, or a
    # node formatted on its own, would have a different one)
    first = testinfra.get_host("docker://kl-kafka-1").file("/var/lib/kafka/data/meta.properties")
    ids = {
        line
        for line in (meta.content_string + first.content_string).splitlines()
        if line.startswith("cluster.id=")
    }
    assert len(ids) == 1, ids


def test_unit_limits_and_heap(host):
    unit = host.file("/etc/systemd/system/kafka.service").content_string
    assert "LimitNOFILE=100000" in unit
    assert "-Xmx384m" in unit
    assert "kafka.Kafka /etc/kafka/server.properties" in unit
