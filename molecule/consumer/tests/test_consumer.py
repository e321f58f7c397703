"""Verify the kepler-log consumer and retention roles on the consumer host."""

import base64
import datetime
import json
import os
import shlex
import time
import uuid

testinfra_hosts = ["kl-consumer-1"]

VENV = "/opt/keplerlog/venv"
CONFIG = "/etc/keplerlog/consumer.yml"
ROOT = "/srv/keplerlog"
USER = "keplerlog"
CRON_FILE = "/etc/cron.d/keplerlog-retention"
AUDIT_CRON_FILE = "/etc/cron.d/keplerlog-audit"
PASSWORD_FILE = "/etc/keplerlog/kafka.password"
PRUNE_CMD = f"{VENV}/bin/keplerlog-prune --config {CONFIG} --days 30 --compress-after 7 --compression gzip"

PRODUCER = r"""
import json, sys
from kafka import KafkaProducer
from keplerlog.record import Batch

spec = json.load(sys.stdin)
# as the agents do: SASL_SSL with their SCRAM user (the consumer's user may not produce)
producer = KafkaProducer(bootstrap_servers=spec["bootstrap"], acks="all", retries=5,
                         security_protocol="SASL_SSL", ssl_cafile=spec["cafile"], sasl_mechanism="SCRAM-SHA-512",
                         sasl_plain_username="keplerlog-agent", sasl_plain_password=spec["password"])
for rec in spec["records"]:
    batch = Batch(service=rec["service"], module=rec["module"], host="kl-test", path=rec["path"],
                  file_id=rec["file"], offset=rec["offset"], lines=rec["value"].count("\n"),
                  ts_ms=spec["ts_ms"])
    producer.send(spec["topic"], key=batch.key(), value=rec["value"].encode(),
                  headers=batch.headers(), timestamp_ms=spec["ts_ms"]).get(timeout=60)
producer.flush()
producer.close()
print("sent", len(spec["records"]))
"""


def _records(service):
    """Records of two modules; each module's lines are consecutive pieces of one source file."""
    records = []
    for module, chunks in (
        ("portal", ["2024-01-01 a first line\n", "2024-01-01 b second\n2024-01-01 c third\n"]),
        ("api", ["GET /x 200\n", "GET /y 404\nGET /z 500\n", "POST /w 201\n"]),
    ):
        offset = 0
        for chunk in chunks:
            records.append(
                {
                    "service": service,
                    "module": module,
                    "path": f"/app/{module}/logs/app.log",
                    "file": f"{module}-inode-1",
                    "offset": offset,
                    "value": chunk,
                }
            )
            offset += len(chunk.encode())
    return records


def _run_as_user(host, command):
    return host.run(f"runuser -u {USER} -- /bin/sh -c {shlex.quote(command)}")


def test_package_installed(host):
    assert host.file(f"{VENV}/bin/keplerlog-consumer").is_file
    assert host.file(f"{VENV}/bin/keplerlog-prune").is_file
    assert host.run(f"{VENV}/bin/python -c 'import keplerlog.record, kafka'").rc == 0
    # log_consumer_kafka_client: kafka-python installs the package alone: confluent-kafka (the
    # default client's, installed with it) is not there
    missing = host.run(f"{VENV}/bin/python -c 'import confluent_kafka'")
    assert missing.rc != 0 and "ModuleNotFoundError" in missing.stderr, missing.stderr


def test_user_and_root(host):
    user = host.user(USER)
    assert user.exists
    assert user.shell == "/usr/sbin/nologin"
    root = host.file(ROOT)
    assert root.is_directory
    assert root.user == USER
    assert root.group == USER
    assert root.mode == 0o750


def test_config(host):
    config = host.file(CONFIG)
    assert config.user == "root"
    assert config.group == USER
    assert config.mode == 0o640
    out = host.run(
        f"{VENV}/bin/python -c 'import json, yaml; print(json.dumps(yaml.safe_load(open(\"{CONFIG}\"))))'"
    )
    assert out.rc == 0, out.stderr
    data = json.loads(out.stdout)
    assert data == {
        "kafka": {
            "bootstrap_servers": "kl-consumer-kafka:9092",
            "topic": "keplerlog",
            "group_id": "keplerlog-consumer",
            "client": "kafka-python",
            "security": {
                "protocol": "sasl_ssl",
                "cafile": "/etc/keplerlog/kafka-ca.crt",
                "sasl_mechanism": "scram-sha-512",
                "username": "keplerlog-consumer",
                "password_file": PASSWORD_FILE,
            },
        },
        "root": ROOT,
        "layout": "{service}/{module}.{day}",
        "timezone": "UTC",
        "max_open_files": 256,
        "metrics": {"port": 9310, "host": "127.0.0.1"},
    }


def secret(name):
    """A password the scenario generated on the controller (molecule.yml, password lookup)."""
    with open(os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "secrets", name)) as f:
        return f.read().split()[0]


def test_password_file_is_the_service_accounts_alone(host):
    f = host.file(PASSWORD_FILE)
    assert f.user == USER and f.mode == 0o600
    assert f.content_string.strip() == secret("keplerlog-consumer")
    # the password is nowhere else: not in the config, not in the unit, not in ps
    assert secret("keplerlog-consumer") not in host.file(CONFIG).content_string
    assert (
        secret("keplerlog-consumer")
        not in host.file("/etc/systemd/system/keplerlog-consumer.service").content_string
    )
    assert secret("keplerlog-consumer") not in host.run("ps -eo args").stdout


def test_unit_hardening(host):
    unit = host.file("/etc/systemd/system/keplerlog-consumer.service").content_string
    for line in (
        "User=keplerlog",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ReadWritePaths={ROOT}",
        "PrivateTmp=yes",
        "LimitNOFILE=65536",
        f"ExecStart={VENV}/bin/keplerlog-consumer --config {CONFIG}",
    ):
        assert line in unit.splitlines()


def test_service_running_and_enabled(host):
    service = host.service("keplerlog-consumer")
    assert service.is_enabled
    # A crash loop must show: the same process for 6 s, and systemd never restarted it.
    pid = host.run("systemctl show -p MainPID --value keplerlog-consumer").stdout.strip()
    assert pid != "0"
    time.sleep(6)
    assert service.is_running
    assert host.run("systemctl show -p MainPID --value keplerlog-consumer").stdout.strip() == pid
    assert host.run("systemctl show -p NRestarts --value keplerlog-consumer").stdout.strip() == "0"
    assert host.run(f"ps -o user= -p {pid}").stdout.strip() == USER


def test_records_land_in_day_files(host):
    service = "verify" + uuid.uuid4().hex[:8]
    records = _records(service)
    ts_ms = int(time.time() * 1000)
    day = datetime.datetime.fromtimestamp(ts_ms / 1000, datetime.UTC).strftime("%Y%m%d")
    spec = {
        "bootstrap": "kl-consumer-kafka:9092",
        "topic": "keplerlog",
        "ts_ms": ts_ms,
        "records": records,
        "cafile": "/etc/keplerlog/kafka-ca.crt",
        "password": secret("keplerlog-agent"),
    }
    # the spec (with the agents' password) goes through a pipe, base64 in the shell's own echo
    encoded = base64.b64encode(json.dumps(spec).encode()).decode()
    out = host.run(f"echo {encoded} | base64 -d | {VENV}/bin/python -c {shlex.quote(PRODUCER)}")
    assert out.rc == 0, out.stderr

    expected = {}
    for rec in records:
        path = f"{ROOT}/{service}/{rec['module']}.{day}"
        expected[path] = expected.get(path, "") + rec["value"]

    deadline = time.time() + 90
    actual = {}
    while time.time() < deadline:
        actual = {
            path: host.file(path).content_string if host.file(path).exists else None for path in expected
        }
        if actual == expected:
            break
        time.sleep(2)
    assert actual == expected
    listing = host.run(f"ls -1 {ROOT}/{service}").stdout.split()
    assert sorted(listing) == sorted(path.rsplit("/", 1)[1] for path in expected)
    for path in expected:
        assert host.file(path).user == USER


def test_cron_file(host):
    cron = host.file(CRON_FILE)
    assert cron.is_file
    assert cron.user == "root"
    lines = [line for line in cron.content_string.splitlines() if line and not line.startswith("#")]
    assert lines == [f"23 4 * * * {USER} {PRUNE_CMD}"]
    assert host.service("cron").is_running
    audit = host.file(AUDIT_CRON_FILE)
    assert audit.is_file and audit.user == "root"
    lines = [line for line in audit.content_string.splitlines() if line and not line.startswith("#")]
    assert lines == [f"30 0 * * * {USER} {VENV}/bin/keplerlog-audit --config {CONFIG} --threshold 0.0001"]
    # the job's command works on this host: no report for an old day is a clear usage error (2)
    out = host.run(f"runuser -u {USER} -- {VENV}/bin/keplerlog-audit --config {CONFIG} --day 20000101")
    assert out.rc == 2 and "20000101" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_prune_removes_exactly_expired_files(host):
    today = datetime.datetime.now(datetime.UTC).date()

    def name(days_ago):
        return (today - datetime.timedelta(days=days_ago)).strftime("%Y%m%d")

    base = f"{ROOT}/prunetest{uuid.uuid4().hex[:8]}"
    expired = [f"{base}/portal.{name(31)}", f"{base}/portal.{name(45)}", f"{base}/api.{name(400)}"]
    # keplerlog-prune: delete when day < today - 30, compress when day < today - 7.
    kept = [f"{base}/portal.{name(0)}", f"{base}/portal.{name(1)}", f"{base}/api.{name(7)}"]
    compressed = [f"{base}/portal.{name(8)}", f"{base}/api.{name(30)}"]
    foreign = [f"{base}/notes.txt", f"{base}/portal.current", f"{base}/portal.2020-01-01"]
    create = " && ".join(f"printf 'line of {p}\\n' > {p}" for p in expired + kept + compressed + foreign)
    out = _run_as_user(host, f"mkdir -p {base} && {create}")
    assert out.rc == 0, out.stderr

    # The command exactly as cron runs it, as the cron user.
    job = host.file(CRON_FILE).content_string.splitlines()[-1].split(None, 6)
    assert job[5] == USER
    out = _run_as_user(host, job[6])
    assert out.rc == 0, out.stdout + out.stderr

    for path in expired:
        assert not host.file(path).exists, path
        assert not host.file(path + ".gz").exists, path
    for path in kept + foreign:
        assert host.file(path).content_string == f"line of {path}\n", path
    for path in compressed:
        assert not host.file(path).exists, path
        gz = host.run(f"gzip -dc {path}.gz")
        assert gz.rc == 0, path
        assert gz.stdout == f"line of {path}\n"
    remaining = sorted(host.run(f"ls -1 {base}").stdout.split())
    expected = sorted(p.rsplit("/", 1)[1] for p in kept + foreign) + sorted(
        p.rsplit("/", 1)[1] + ".gz" for p in compressed
    )
    assert remaining == sorted(expected)
    # Files written by the consumer today are untouched.
    assert host.run(f"find {ROOT} -name '*.gz' -path '*verify*'").stdout.strip() == ""
