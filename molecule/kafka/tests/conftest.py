"""Shared helpers for the Kafka scenario's Testinfra tests."""

import base64
import os

import pytest
import testinfra

NODES = ["kl-kafka-1", "kl-kafka-2", "kl-kafka-3"]
TOPIC = "keplerlog"
BOOTSTRAP = ",".join(f"{n}:9092" for n in NODES)
ADMIN_PYTHON = "/opt/kafka-admin-venv/bin/python"
TOOLS_ENV = "KAFKA_HEAP_OPTS=-Xmx128m"


def inventory():
    if os.environ.get("MOLECULE_INVENTORY_FILE"):
        return os.environ["MOLECULE_INVENTORY_FILE"]
    return os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "inventory")


def node(name):
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=inventory())


def kafka_tool(host, cls, args, check=True):
    cmd = host.run(f"{TOOLS_ENV} /usr/local/bin/kafka-class {cls} {args}")
    if check:
        assert cmd.rc == 0, f"{cls} {args}: rc={cmd.rc}\n{cmd.stdout}\n{cmd.stderr}"
    return cmd


def run_python(host, script, *args):
    """Run a Python script with the admin virtualenv (kafka-python) on the host."""
    encoded = base64.b64encode(script.encode()).decode()
    quoted = " ".join(f"'{a}'" for a in args)
    return host.run(
        f"echo {encoded} | base64 -d > /tmp/kl-test.py && {ADMIN_PYTHON} /tmp/kl-test.py {quoted}"
    )


@pytest.fixture(scope="module")
def nodes():
    return {name: node(name) for name in NODES}
