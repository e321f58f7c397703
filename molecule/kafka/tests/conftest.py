"""Shared helpers for the Kafka scenario's Testinfra tests."""

import base64
import os

import pytest
import testinfra

NODES = ["kl-kafka-1", "kl-kafka-2", "kl-kafka-3"]
TOPIC = "keplerlog"
# Kafka's own tools speak to the INTERNAL listener (TLS) with the node's certificate, a super
# user, as the role's rolling restart does; clients use the SCRAM listener on 9092.
BOOTSTRAP = ",".join(f"{n}:9094" for n in NODES)
CLIENT_BOOTSTRAP = ",".join(f"{n}:9092" for n in NODES)
ADMIN_CONFIG = "/etc/kafka/admin-client.properties"
ADMIN_PYTHON = "/opt/kafka-admin-venv/bin/python"
TOOLS_ENV = "KAFKA_HEAP_OPTS=-Xmx128m"
CA = "/etc/kafka/tls/ca.crt"


def inventory():
    if os.environ.get("MOLECULE_INVENTORY_FILE"):
        return os.environ["MOLECULE_INVENTORY_FILE"]
    return os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "inventory")


def node(name):
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=inventory())


def kafka_tool(host, cls, args, check=True):
    """A Kafka command-line tool as the node's admin identity (TLS to the INTERNAL listener)."""
    cmd = host.run(f"{TOOLS_ENV} /usr/local/bin/kafka-class {cls} --command-config {ADMIN_CONFIG} {args}")
    if check:
        assert cmd.rc == 0, f"{cls} {args}: rc={cmd.rc}\n{cmd.stdout}\n{cmd.stderr}"
    return cmd


def run_python(host, script, *args, env=None, python=ADMIN_PYTHON):
    """Run a Python script with the admin virtualenv (kafka-python) on the host.

    `env` (passwords) goes through a 0600 file read by the shell, never through arguments, so
    the test itself puts no secret into `ps`.
    """
    encoded = base64.b64encode(script.encode()).decode()
    quoted = " ".join(f"'{a}'" for a in args)
    prefix = ""
    if env:
        lines = "".join(f"export {k}={v}\n" for k, v in env.items())
        secret = base64.b64encode(lines.encode()).decode()
        prefix = f"umask 077 && echo {secret} | base64 -d > /tmp/kl-test.env && . /tmp/kl-test.env && rm /tmp/kl-test.env && "
    return host.run(
        f"{prefix}echo {encoded} | base64 -d > /tmp/kl-test.py && {python} /tmp/kl-test.py {quoted}"
    )


def secret(name):
    """A password the scenario generated on the controller (molecule.yml, password lookup)."""
    path = os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "secrets", name)
    with open(path) as f:
        return f.read().split()[0]


@pytest.fixture(scope="module")
def nodes():
    return {name: node(name) for name in NODES}
