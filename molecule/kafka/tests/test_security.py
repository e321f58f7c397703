"""The secure cluster: every check fails when its control is missing.

Plaintext is refused on every port; TLS listeners between nodes want a certificate from the
cluster's CA (a forged one claiming a broker's name is refused); SCRAM refuses a wrong password;
the agents' principal can only write the log topic and the consumer's only read it with its
group; no password reaches `ps`, a node's files or Ansible's output. Run from kl-kafka-1.
"""

import json
import os

import pytest
from conftest import CA, NODES, TOPIC, run_python, secret

testinfra_hosts = ["kl-kafka-1"]

# stdlib only: one Kafka ApiVersions v0 request, plain or over TLS; prints what came back.
PROBE = r"""
import socket, ssl, struct, sys
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cafile, certfile, keyfile = (sys.argv[4:7] + ["-", "-", "-"])[:3]
client = b"kl-probe"
body = struct.pack(">hhih", 18, 0, 424242, len(client)) + client
try:
    sock = socket.create_connection((host, port), timeout=10)
    if mode == "tls":
        ctx = ssl.create_default_context(cafile=cafile)
        if certfile != "-":
            ctx.load_cert_chain(certfile, keyfile)
        sock = ctx.wrap_socket(sock, server_hostname=host)
    sock.sendall(struct.pack(">i", len(body)) + body)
    head = b""
    while len(head) < 8:
        chunk = sock.recv(8 - len(head))
        if not chunk:
            break
        head += chunk
    ok = len(head) == 8 and struct.unpack(">i", head[4:8])[0] == 424242
    print("answered" if ok else "refused: %r" % head[:8])
except Exception as exc:
    print("refused: %s: %s" % (type(exc).__name__, exc))
"""

# A CA that is not the cluster's, and a certificate from it that claims to be kl-kafka-1.
FORGE = r"""
import datetime, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
out, name = sys.argv[1], sys.argv[2]
now = datetime.datetime.now(datetime.timezone.utc)
def cert(subject, issuer, key, sign_key, ca):
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return b.sign(sign_key, hashes.SHA256())
ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the cluster's CA")])
ca = cert(ca_name, ca_name, ca_key, ca_key, True)
leaf = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), ca_name, key, ca_key, False)
open(out + "/ca.crt", "wb").write(ca.public_bytes(serialization.Encoding.PEM))
open(out + "/node.crt", "wb").write(leaf.public_bytes(serialization.Encoding.PEM))
open(out + "/node.key", "wb").write(key.private_bytes(serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
print("forged")
"""

# What each identity may do, tried for real over SASL_SSL; prints {action: "ok" | error}.
ACCESS = r"""
import json, logging, os, sys, time, uuid
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, KafkaAdminClient, NewTopic, ResourcePattern, ResourceType
bootstrap, topic = sys.argv[1].split(","), sys.argv[2]
seen = []
class Last(logging.Handler):
    def emit(self, record):
        seen.append(record.getMessage())
logging.getLogger("kafka").addHandler(Last(logging.WARNING))
def auth(user, password=None, cafile=None):
    return dict(bootstrap_servers=bootstrap, security_protocol="SASL_SSL", ssl_cafile=cafile or os.environ["CA"],
                sasl_mechanism="SCRAM-SHA-512", sasl_plain_username=user, request_timeout_ms=10000,
                sasl_plain_password=password or os.environ[user.replace("-", "_").upper()])
out = {}
def attempt(name, fn):
    del seen[:]
    try:
        fn()
        out[name] = "ok"
    except Exception as exc:
        why = [m for m in seen if "Authentication failed" in m or "CERTIFICATE_VERIFY_FAILED" in m]
        out[name] = "%s: %s%s" % (type(exc).__name__, exc, (" | " + why[-1]) if why else "")
def produce(user):
    p = KafkaProducer(acks="all", max_block_ms=20000, **auth(user))
    try:
        p.send(topic, b"access-check").get(timeout=20)
    finally:
        p.close(timeout=5)
def consume(user, group):
    c = KafkaConsumer(group_id=group, enable_auto_commit=False, consumer_timeout_ms=3000, **auth(user))
    try:
        tps = [TopicPartition(topic, p) for p in range(4)]
        if group:
            c.subscribe([topic])
            deadline = time.time() + 30
            while not c.assignment() and time.time() < deadline:
                c.poll(timeout_ms=500)
            if not c.assignment():
                raise RuntimeError("no partitions assigned")
        else:
            c.assign(tps)
            c.seek_to_beginning()
            for _ in range(6):
                c.poll(timeout_ms=500)
                if c.position(tps[0]) is not None:
                    pass
        c.poll(timeout_ms=2000)
        c.end_offsets(tps)
    finally:
        c.close()
def admin(user, action):
    a = KafkaAdminClient(**auth(user))
    try:
        if action == "create":
            a.create_topics([NewTopic("kl-forbidden-" + uuid.uuid4().hex[:8], 1, 1)])
        elif action == "delete":
            a.delete_topics([topic])
        elif action == "acl":
            r = a.create_acls([ACL(principal="User:" + user, host="*", operation=ACLOperation.ALL,
                                   permission_type=ACLPermissionType.ALLOW,
                                   resource_pattern=ResourcePattern(ResourceType.TOPIC, "*", ACLResourcePatternType.LITERAL))])
            if r.get("failed"):
                raise RuntimeError("create_acls failed: %s" % (r["failed"],))
    finally:
        a.close()
attempt("agent produces", lambda: produce("keplerlog-agent"))
attempt("agent reads the topic", lambda: consume("keplerlog-agent", None))
attempt("agent joins the consumer group", lambda: consume("keplerlog-agent", "keplerlog-consumer"))
attempt("agent creates a topic", lambda: admin("keplerlog-agent", "create"))
attempt("agent deletes the topic", lambda: admin("keplerlog-agent", "delete"))
attempt("agent alters ACLs", lambda: admin("keplerlog-agent", "acl"))
attempt("consumer reads with its group", lambda: consume("keplerlog-consumer", "keplerlog-consumer"))
attempt("consumer produces", lambda: produce("keplerlog-consumer"))
attempt("consumer creates a topic", lambda: admin("keplerlog-consumer", "create"))
attempt("wrong password", lambda: KafkaAdminClient(**auth("keplerlog-agent", password="not-" + os.environ["KEPLERLOG_AGENT"])).close())
attempt("broker certificate from another CA", lambda: KafkaAdminClient(**auth("keplerlog-agent", cafile="/tmp/kl-forged/ca.crt")).close())
attempt("admin lists topics", lambda: KafkaAdminClient(**auth("kafka-admin", password=os.environ["KAFKA_ADMIN"])).list_topics())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def forged(host):
    out = run_python(
        host, "import os; os.makedirs('/tmp/kl-forged', exist_ok=True)", python="/usr/bin/python3"
    )
    assert out.rc == 0, out.stderr
    made = run_python(host, FORGE, "/tmp/kl-forged", "kl-kafka-1", python="/usr/bin/python3")
    assert made.stdout.strip() == "forged", made.stdout + made.stderr
    return "/tmp/kl-forged"


def probe(host, target, port, mode, *files):
    out = run_python(host, PROBE, target, str(port), mode, *files, python="/usr/bin/python3")
    assert out.rc == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("port", [9092, 9093, 9094])
def test_plaintext_is_refused_on_every_port(host, port):
    # the same request over TLS with the node's certificate is answered (the probe works)
    assert (
        probe(host, "kl-kafka-2", port, "tls", CA, "/etc/kafka/tls/node.crt", "/etc/kafka/tls/node.key")
        == "answered"
    )
    for target in NODES:
        assert probe(host, target, port, "plain").startswith("refused"), (target, port)


@pytest.mark.parametrize("port", [9093, 9094])
def test_node_listeners_want_a_certificate_of_the_cluster_ca(host, forged, port):
    """Controller and inter-broker traffic: TLS with client certificates from the cluster's CA."""
    no_cert = probe(host, "kl-kafka-2", port, "tls", CA)
    assert no_cert.startswith("refused"), no_cert
    # a certificate from another CA that claims to be kl-kafka-1 (a super user) is refused
    forged_cert = probe(host, "kl-kafka-2", port, "tls", CA, f"{forged}/node.crt", f"{forged}/node.key")
    assert forged_cert.startswith("refused"), forged_cert


def test_client_listener_checks_the_broker_name(host):
    # kl-kafka-2's certificate does not name "localhost": hostname verification refuses it
    assert probe(host, "kl-kafka-2", 9092, "tls", CA) == "answered"
    wrong_name = run_python(
        host,
        PROBE.replace("server_hostname=host", "server_hostname='localhost'"),
        "kl-kafka-2",
        "9092",
        "tls",
        CA,
        python="/usr/bin/python3",
    ).stdout.strip()
    assert "refused" in wrong_name and "match" in wrong_name.lower(), wrong_name


@pytest.fixture(scope="module")
def access(host, forged):
    env = {
        "CA": CA,
        "KEPLERLOG_AGENT": secret("keplerlog-agent"),
        "KEPLERLOG_CONSUMER": secret("keplerlog-consumer"),
        "KAFKA_ADMIN": secret("kafka-admin"),
    }
    out = run_python(host, ACCESS, ",".join(f"{n}:9092" for n in NODES), TOPIC, env=env)
    assert out.rc == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))
    return result


def test_each_identity_can_do_its_job(access):
    assert access["agent produces"] == "ok"
    assert access["consumer reads with its group"] == "ok"
    assert access["admin lists topics"] == "ok"


@pytest.mark.parametrize(
    "action",
    [
        "agent reads the topic",
        "agent joins the consumer group",
        "agent creates a topic",
        "agent deletes the topic",
        "agent alters ACLs",
        "consumer produces",
        "consumer creates a topic",
    ],
)
def test_each_identity_can_do_nothing_else(access, action):
    assert access[action] != "ok", action
    assert "Authorization" in access[action] or "authoriz" in access[action].lower(), access[action]


def test_wrong_password_and_unknown_ca_are_refused(access):
    assert "Authentication failed" in access["wrong password"], access["wrong password"]
    assert "CERTIFICATE_VERIFY_FAILED" in access["broker certificate from another CA"]


def test_the_topic_survived(host):
    from conftest import kafka_tool

    out = kafka_tool(host, "org.apache.kafka.tools.TopicCommand", "--bootstrap-server kl-kafka-1:9094 --list")
    assert TOPIC in out.stdout.split()


def passwords():
    return [secret(n) for n in ("kafka-admin", "keplerlog-agent", "keplerlog-consumer")]


@pytest.mark.parametrize("name", NODES)
def test_no_password_on_the_nodes(name):
    """Not in any process's arguments, not in any file under the usual places."""
    from conftest import node

    target = node(name)
    ps = target.run("ps -eo args").stdout
    assert "kafka.Kafka" in ps  # the broker's own command line was looked at
    for n, password in enumerate(passwords()):
        assert password not in ps
        # the pattern reaches the node as a 0600 file (module arguments), not as an argument
        target.ansible("copy", f"content={password} dest=/root/kl-pattern-{n} mode=0600", check=False)
    found = target.run(
        "grep -rlF -f /root/kl-pattern-0 -f /root/kl-pattern-1 -f /root/kl-pattern-2 --exclude='kl-pattern-*' "
        "/etc /opt /var/lib/kafka /var/log /tmp /root /home 2>/dev/null; rm -f /root/kl-pattern-*"
    )
    assert found.stdout.strip() == "", found.stdout
    # the search works: the server's config holds the authorizer it is supposed to
    assert target.file("/etc/kafka/server.properties").contains("StandardAuthorizer")


def test_no_password_in_ansible_output():
    log = os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "ansible.log")
    with open(log, encoding="utf-8", errors="replace") as f:
        text = f.read()
    # the log holds the converge (and idempotence) runs: the user task ran and was logged
    assert "Manage SCRAM users" in text and "Make the cluster's ACLs exactly kafka_acls" in text
    for password in passwords():
        assert password not in text


@pytest.mark.parametrize("name", NODES)
def test_the_first_admin_was_created_at_format(name):
    """--add-scram put kafka-admin's credential into the bootstrap metadata (through an argfile
    that is gone again), so an admin exists from the cluster's first start."""
    from conftest import node

    target = node(name)
    checkpoint = target.run("grep -ac kafka-admin /var/lib/kafka/data/bootstrap.checkpoint")
    assert checkpoint.stdout.strip() not in ("", "0"), checkpoint.stdout + checkpoint.stderr
    assert not target.file("/etc/kafka/format.args").exists
