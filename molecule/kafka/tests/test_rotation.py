"""Certificate rotation (side_effect.yml): every node serves a new certificate, rolled out by the
role's rolling restart while a producer wrote the whole time, and not one record was lost."""

import json

import pytest
from conftest import NODES, node, run_python

# The serial number of the certificate a broker presents on 9092, and of the file on disk.
SERIALS = r"""
import socket, ssl, sys
from cryptography import x509
host = sys.argv[1]
ctx = ssl.create_default_context(cafile="/etc/kafka/tls/ca.crt")
with socket.create_connection((host, 9092), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname=host) as tls:
        served = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
on_disk = x509.load_pem_x509_certificate(open("/etc/kafka/tls/node.crt", "rb").read())
print(served.serial_number, on_disk.serial_number)
"""


@pytest.mark.parametrize("name", NODES)
def test_every_node_serves_its_new_certificate(name):
    target = node(name)
    before = target.file("/root/kl-serial-before")
    assert before.exists, "side_effect.yml did not run"
    out = run_python(target, SERIALS, name, python="/usr/bin/python3")
    assert out.rc == 0, out.stderr
    served, on_disk = (int(x) for x in out.stdout.split())
    assert on_disk != int(before.content_string.strip()), "the certificate was not re-issued"
    assert served == on_disk, "the broker still serves the old certificate (no restart)"


def test_no_record_lost_while_rotating():
    result = json.loads(node("kl-kafka-1").file("/tmp/kl-rotation.json").content_string)
    print(result)
    assert result["sent"] > 100, result  # it wrote through the rolling restart
    assert result["failed"] == 0, result
    assert result["acked"] == result["sent"], result
    assert result["read"] == result["sent"], result


def test_the_reconverge_removed_the_acl_the_inventory_does_not_list():
    from conftest import kafka_tool

    before = node("kl-kafka-1").file("/root/kl-acls-before").content_string
    assert "kl-stray" in before, before  # side_effect.yml really added it
    out = kafka_tool(
        node("kl-kafka-1"), "org.apache.kafka.tools.AclCommand", "--bootstrap-server kl-kafka-1:9094 --list"
    ).stdout
    assert "User:keplerlog-agent" in out and "User:keplerlog-consumer" in out, out  # the listed ones
    assert "kl-stray" not in out, out
