"""Testinfra checks of the portal service image (container kl-image-portal) next to kl-image-kafka.

The tests run in file order: the last one stops the container (`docker stop`) and checks that no
line the application wrote before the stop is missing in Kafka.
"""

import io
import json
import os
import re
import tarfile
import threading
import time

import docker
import pytest
import testinfra
from kafka import KafkaConsumer, TopicPartition

CONTAINER = "kl-image-portal"
KAFKA = "kl-image-kafka"
NETWORK = "kl-image-net"
TOPIC = "keplerlog"
LOG_DIR = "/app/portal/logs"
SEQ = re.compile(rb" seq=(\d+)$")
STOP_TIMEOUT = 60


@pytest.fixture(scope="module")
def dockerc():
    return docker.from_env()


@pytest.fixture(scope="module")
def app():
    return testinfra.get_host(f"docker://{CONTAINER}")


@pytest.fixture(scope="module")
def bootstrap(dockerc):
    """The broker's HOST listener (SASL_SSL, advertised at its address on kl-image-net): reachable
    from here."""
    net = dockerc.containers.get(KAFKA).attrs["NetworkSettings"]["Networks"][NETWORK]
    return f"{net['IPAddress']}:9095"


def auth():
    """The consumers' identity (may read the log topic), from the scenario's generated files."""
    eph = os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]
    with open(os.path.join(eph, "secrets", "keplerlog-consumer")) as f:
        password = f.read().split()[0]
    return {
        "security_protocol": "SASL_SSL",
        "ssl_cafile": os.path.join(eph, "pki", "kafka-ca", "ca.crt"),
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "keplerlog-consumer",
        "sasl_plain_password": password,
    }


def headers_of(rec):
    return {k: v.decode() for k, v in (rec.headers or [])}


def is_watermark(rec) -> bool:
    """The agent's per-file accounts for the completeness audit (kl.v wm1): no log lines."""
    return headers_of(rec).get("kl.v") == "wm1"


def consume(bootstrap, until_end=True, want=1, timeout=60, marks=None):
    """Read the topic from the beginning: up to its current end, or until `want` records arrived.

    Returns the data records; watermarks go to the list `marks` when one is given."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        consumer_timeout_ms=1000,
        **auth(),
    )
    try:
        deadline = time.monotonic() + timeout
        parts = None
        while not parts and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(TOPIC)
            time.sleep(0.2)
        tps = [TopicPartition(TOPIC, p) for p in sorted(parts or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        records = []
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                for rec in batch:
                    if not is_watermark(rec):
                        records.append(rec)
                    elif marks is not None:
                        marks.append(rec)
            if until_end and all(consumer.position(tp) >= end[tp] for tp in tps):
                break
            if not until_end and len(records) >= want:
                break
        return records
    finally:
        consumer.close()


def rebuild(records):
    """Each source file's bytes from its records' (kl.file, kl.offset); asserts no gap and that
    overlapping (re-sent) bytes equal what they overlap. Returns ({file: bytes}, {file: path})."""
    by_file, paths = {}, {}
    for rec in records:
        h = headers_of(rec)
        by_file.setdefault(h["kl.file"], []).append((int(h["kl.offset"]), rec.value))
        paths[h["kl.file"]] = h["kl.path"]
    files = {}
    for file_id, parts in by_file.items():
        out = bytearray()
        for offset, value in sorted(parts):
            end = offset + len(value)
            assert offset <= len(out), f"gap in {paths[file_id]} ({file_id}) at {len(out)}"
            assert out[offset:end] == value[: max(0, min(end, len(out)) - offset)], "re-sent bytes differ"
            if end > len(out):
                out += value[len(out) - offset :]
        files[file_id] = bytes(out)
    return files, paths


def seqs_in(data: bytes):
    return [int(m.group(1)) for line in data.splitlines() if (m := SEQ.search(line))]


def test_supervisord_runs_app_and_agent(app):
    deadline = time.monotonic() + 40
    while True:
        out = app.run("supervisorctl status")
        status = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines() if line.strip()}
        if status.get("app") == "RUNNING" and status.get("agent") == "RUNNING":
            break
        assert time.monotonic() < deadline, f"supervisorctl status:\n{out.stdout}"
        time.sleep(2)
    assert app.process.get(pid=1).args.startswith("/usr/bin/python3 /usr/bin/supervisord")


def test_agent_config_rendered_from_env(app):
    cfg = app.file("/etc/keplerlog/agent.yml")
    assert cfg.exists
    text = cfg.content_string
    assert "service: shop" in text
    assert "module: portal" in text
    assert "kl-image-kafka:9092" in text
    assert "host: kl-image-dockerhost" in text
    assert "state_file: /var/lib/keplerlog/agent-state.json" in text
    assert f"{LOG_DIR}/*.log" in text
    # the drain ends (checkpoint written) before supervisord's SIGKILL at KEPLERLOG_DRAIN_TIMEOUT
    drain = int(app.run("printenv KEPLERLOG_DRAIN_TIMEOUT").stdout)
    assert f"shutdown_timeout_s: {drain - 5}" in text
    # converge.yml chose the kafka-python client over the role's default (librdkafka): rendered,
    # and the running agent ships without loading librdkafka
    assert "client: kafka-python" in text
    pid = supervisor_pids(app)["agent"]
    wait_for_agent_ack(app)
    # read as the agent's own user: docker exec's root lacks the ptrace right /proc/PID/maps needs
    maps = app.run(f"runuser -u keplerlog -- cat /proc/{pid}/maps").stdout
    assert "python3" in maps and "librdkafka" not in maps, f"agent pid {pid} maps"
    # the agent runs unprivileged; its state lives in the volume, never in the app's log dir
    assert app.file("/var/lib/keplerlog").user == "keplerlog"
    assert not app.file(f"{LOG_DIR}/agent-state.json").exists


def test_app_writes_and_rotates_its_logs(app):
    assert app.file(f"{LOG_DIR}/portal.log").user == "app"
    assert app.file("/app/portal/start.sh").mode & 0o111
    assert app.file("/app/portal/stop.sh").mode & 0o111
    deadline = time.monotonic() + 60
    while not app.file(f"{LOG_DIR}/portal.log.1").exists:
        assert time.monotonic() < deadline, "no rotation within 60 s"
        time.sleep(2)
    line = app.run(f"head -n 1 {LOG_DIR}/portal.log").stdout
    assert re.match(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \[[^\]]+\] c\.k\.portal\.\w+ - .* seq=\d+$", line
    )


def wait_for_agent_ack(app, timeout=60):
    """Wait until the agent's producer had a record acknowledged (it connected and shipped)."""
    probe = (
        "import urllib.request; print(sum(float(line.split()[-1]) for line in urllib.request.urlopen("
        "'http://127.0.0.1:9311/metrics', timeout=5).read().decode().splitlines() "
        "if line.startswith('keplerlog_agent_records_acked_total ')))"
    )
    deadline = time.monotonic() + timeout
    while True:
        out = app.run(f'/opt/keplerlog/bin/python -c "{probe}"').stdout.strip()
        if out and float(out) > 0:
            return
        assert time.monotonic() < deadline, f"no record acknowledged in {timeout} s (records_acked {out!r})"
        time.sleep(1)


def supervisor_pids(app):
    out = app.run("supervisorctl pid app agent").stdout.split()
    return dict(zip(("app", "agent"), out, strict=True))


def wait_running(app, before, timeout=40):
    deadline = time.monotonic() + timeout
    while True:
        out = app.run("supervisorctl status").stdout
        lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
        now = supervisor_pids(app)
        if all("RUNNING" in lines.get(name, "") and now[name] != before[name] for name in before):
            return now
        assert time.monotonic() < deadline, f"not restarted:\n{out}"
        time.sleep(1)


def test_programs_restart_when_they_die(app):
    before = supervisor_pids(app)
    # the agent is killed hard (it resumes from its state file: no line may be lost); the
    # application exits on its own (SIGTERM to the Python process, not through supervisord)
    assert app.run(f"kill -KILL {before['agent']}").rc == 0
    assert app.run("pkill -TERM -u app -f bin/logdemo.py").rc == 0
    wait_running(app, before)


def test_records_arrive_with_headers(bootstrap):
    records = consume(bootstrap, until_end=False, want=50, timeout=60)
    assert len(records) >= 50, f"{len(records)} records in Kafka within 60 s"
    for rec in records:  # every record, not only the first
        h = headers_of(rec)
        assert rec.key == b"shop/portal"
        assert h["kl.v"] == "1"
        assert h["kl.service"] == "shop"
        assert h["kl.module"] == "portal"
        assert h["kl.host"] == "kl-image-dockerhost"
        assert h["kl.path"].startswith(f"{LOG_DIR}/portal.log")
        assert h["kl.file"]
        assert int(h["kl.offset"]) >= 0
        assert int(h["kl.lines"]) == rec.value.count(b"\n")
        assert int(h["kl.ts"]) > 1_700_000_000_000
    assert any(seqs_in(rec.value) for rec in records)


BURST = 2000
BURST_LINE = re.compile(rb"^burst=(\d+)$")
BURST_TAIL = b"burst-tail-without-newline"
SIGTERM_BIT = 1 << (15 - 1)


def pending_signals(app, pid):
    """The process's pending signal mask (per-thread or shared), from /proc."""
    status = app.run(f"cat /proc/{pid}/status").stdout
    masks = [
        int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd", "ShdPnd"))
    ]
    return masks[0] | masks[1]


def stop_with_unread_bytes(app, container):
    """`docker stop` with bytes the agent is certain not to have read when its SIGTERM arrives.

    The agent is frozen (SIGSTOP) while a burst is written, and thawed only once supervisord
    (after the application has stopped) has sent it SIGTERM: the stop request is then the
    first thing it sees, before any wake-up for the burst.
    """
    agent_pid = supervisor_pids(app)["agent"]
    assert app.run(f"kill -STOP {agent_pid}").rc == 0
    burst = "".join(f"burst={i}\n" for i in range(1, BURST + 1)) + BURST_TAIL.decode()
    assert app.run(f"printf '%s' '{burst}' > {LOG_DIR}/burst.log").rc == 0
    result = {}

    def stop():
        t0 = time.monotonic()
        container.stop(timeout=STOP_TIMEOUT)
        result["took"] = time.monotonic() - t0

    stopper = threading.Thread(target=stop)
    stopper.start()
    deadline = time.monotonic() + STOP_TIMEOUT - 10
    while not pending_signals(app, agent_pid) & SIGTERM_BIT:
        assert time.monotonic() < deadline, "supervisord never sent SIGTERM to the agent"
        time.sleep(0.2)
    assert app.run(f"kill -CONT {agent_pid}").rc == 0
    stopper.join(STOP_TIMEOUT + 10)
    return result["took"]


def test_docker_stop_loses_no_line(dockerc, app, bootstrap):
    container = dockerc.containers.get(CONTAINER)
    assert container.attrs["Config"].get("StopTimeout") == STOP_TIMEOUT
    took = stop_with_unread_bytes(app, container)
    assert container.wait(timeout=10)["StatusCode"] == 0
    assert took < STOP_TIMEOUT - 5, f"docker stop took {took:.1f} s (SIGKILL?)"
    logs = container.logs().decode(errors="replace")
    assert logs.index("stopped: app (exit status 0)") < logs.index("stopped: agent (exit status 0)"), logs[
        -3000:
    ]
    assert "not acknowledged" not in logs, logs[-3000:]

    # every line in the container's log files (current and rotated) ...
    stream, _ = container.get_archive(LOG_DIR)
    in_files = set()
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        for member in tar.getmembers():
            if member.isfile():
                in_files.update(seqs_in(tar.extractfile(member).read()))
    assert len(in_files) > 1000
    # ... is in Kafka
    # the application's numbering is contiguous (no rotated file missing from the comparison)
    assert min(in_files) == 1 and len(in_files) == max(in_files), (
        "seq numbers in the log files are not contiguous"
    )
    marks = []
    records = consume(bootstrap, until_end=True, timeout=90, marks=marks)
    # multiline (rendered agent.yml): a stack trace stays in the record of its first line
    split_events = sum(
        not re.match(rb"\d{4}-\d\d-\d\d ", rec.value)
        for rec in records
        if not headers_of(rec)["kl.path"].endswith("/burst.log")
    )
    # each source file's bytes, rebuilt from (kl.file, kl.offset) as the consumer does: records
    # re-sent after the agent's kill -9 overlap what was sent before (they must equal it)
    files, paths = rebuild(records)
    in_kafka = []
    burst = b""
    for file_id, data in files.items():
        if paths[file_id].endswith("/burst.log"):
            burst += data
        else:
            in_kafka.extend(seqs_in(data))
    replayed = sum(len(rec.value) for rec in records) - sum(len(d) for d in files.values())
    missing = sorted(in_files - set(in_kafka))
    assert not missing, f"{len(missing)} of {len(in_files)} lines missing in Kafka, first: {missing[:20]}"
    assert split_events == 0, f"{split_events} records start inside a multi-line event"
    dups = len(in_kafka) - len(set(in_kafka))
    assert dups == 0, f"{dups} lines in Kafka twice (at two different offsets of their files)"
    # the burst the agent had not read when it was stopped: every line, and the partial last one
    shipped = burst
    burst_seqs = [int(m.group(1)) for line in shipped.split(b"\n") if (m := BURST_LINE.match(line))]
    assert burst_seqs == list(range(1, BURST + 1)), (
        f"{BURST - len(set(burst_seqs))} of {BURST} burst lines lost"
    )
    assert shipped.endswith(BURST_TAIL), "the partial last line was not shipped"
    # the agent's watermarks (one per file at its stop, at least) ride on the data's key and
    # never claim more acknowledged bytes than Kafka holds of their file
    assert marks, "no watermark from the agent"
    for rec in marks:
        account = json.loads(rec.value)
        file_id = headers_of(rec)["kl.file"]
        assert rec.key == b"shop/portal"
        assert account["acked"] <= len(files.get(file_id, b"")) or account["acked"] == account["first"], (
            f"watermark of {file_id} claims {account['acked']} bytes, Kafka holds {len(files.get(file_id, b''))}"
        )
    print(
        f"docker stop: {took:.1f} s; lines: {len(in_files)} in files, {len(in_kafka)} in Kafka "
        f"({replayed} bytes re-sent, 0 duplicates); burst {len(burst_seqs)} of {BURST} + partial line"
    )
