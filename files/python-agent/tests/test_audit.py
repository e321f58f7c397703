"""The completeness audit end to end: records and watermarks produced to a real Kafka as the agent
would, the consumer run on them, then keplerlog-audit on its reports.

Every test knows the true loss it made (records deleted from the topic before the consumer read
them, bytes the agent reported lost, an agent that stopped sending) and checks that the fault
really happened before checking that the report and the audit say exactly that, and zero on a
clean run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
from kafka import KafkaAdminClient, KafkaProducer, TopicPartition

from keplerlog.audit import main as audit_main
from keplerlog.audit.report import report_rel
from keplerlog.consumer.app import ConsumerApp
from keplerlog.record import Batch, Watermark
from keplerlog.testing.consumer import consumer_config

DAY0 = 1_699_913_600_000  # 2023-11-13 22:13:20 UTC
DAY1 = DAY0 + 86_400_000  # 2023-11-14
D0, D1 = "20231113", "20231114"


# -- producing as the agent does ---------------------------------------------------------------


class Agent:
    """Produces one host's records: data records per file (offsets tracked) and watermarks."""

    def __init__(self, kafka, topic, host="h1", service="shop", module="portal"):
        self.topic, self.host, self.service, self.module = topic, host, service, module
        self.producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", linger_ms=5)
        self.offsets: dict[str, int] = {}
        self.sent: dict[str, bytearray] = {}  # per file: every byte shipped

    def data(self, file_id, value, ts=DAY1):
        """One data record of `file_id`; returns its RecordMetadata (partition, offset)."""
        offset = self.offsets.get(file_id, 0)
        b = Batch(
            self.service,
            self.module,
            self.host,
            f"/app/{file_id}.log",
            file_id,
            offset,
            value.count(b"\n"),
            ts,
        )
        meta = self.producer.send(self.topic, value, key=b.key(), headers=b.headers()).get(30)
        self.offsets[file_id] = offset + len(value)
        self.sent.setdefault(file_id, bytearray()).extend(value)
        return meta

    def watermark(self, file_id, ts=DAY1, seen=None, state="open", lost=(), **labels):
        """The file's watermark: everything sent so far acknowledged (each send waited for its ack)."""
        acked = self.offsets.get(file_id, 0)
        fields = {"service": self.service, "module": self.module, "host": self.host} | labels
        mark = Watermark(
            path=f"/app/{file_id}.log",
            file_id=file_id,
            ts_ms=ts,
            first=0,
            seen=acked if seen is None else seen,
            acked=acked,
            state=state,
            lost=tuple(lost),
            **fields,
        )
        return self.raw(mark.key(), mark.headers(), mark.value())

    def raw(self, key, headers, value):
        return self.producer.send(self.topic, value, key=key, headers=headers).get(30)

    def close(self):
        self.producer.flush()
        self.producer.close()


def lines(n, tag="l", width=100):
    """n lines of exactly `width` bytes (newline included)."""
    return [f"{tag}{i:0{width - len(tag) - 1}d}\n".encode() for i in range(n)]


# -- running the consumer ------------------------------------------------------------------------


def config(kafka, topic, root, **kw):
    # The fixed 2023 timestamps are years old: a wide window keeps them on their own days.
    return consumer_config(kafka.bootstrap, topic, root, **{"ts_max_age_days": 100_000, **kw})


class Running:
    """ConsumerApp in a thread until stop()."""

    def __init__(self, cfg):
        self.app = ConsumerApp(cfg)
        self.thread = threading.Thread(target=self.app.run, daemon=True)
        self.thread.start()

    @property
    def counts(self):
        return self.app.metrics.counts

    def wait(self, predicate, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.counts):
                return
            time.sleep(0.1)
        raise AssertionError(f"timeout; counts={dict(self.counts)}")

    def stop(self):
        self.scrape = self.app.metrics.render()  # before the partitions are revoked at shutdown
        self.app.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


def consume(kafka, topic, root, until, **kw):
    run = Running(config(kafka, topic, root, **kw))
    try:
        run.wait(until)
    finally:
        run.stop()
    return run


def rows(root, day=D1):
    """Every source row of a day's reports, by file id."""
    out = {}
    for path in sorted((root / ".keplerlog/audit" / day).glob("*.json")):
        out.update({r["file_id"]: r for r in json.loads(path.read_bytes())["sources"]})
    return out


def hosts(root, day):
    """The hosts of every row of a day's reports."""
    found = [json.loads(p.read_bytes())["sources"] for p in (root / ".keplerlog/audit" / day).glob("*.json")]
    return sorted(r["host"] for sources in found for r in sources)


def day_files(root):
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".keplerlog" not in p.parts
    }


def audit(capsys, root, *args):
    rc = audit_main.main(["--root", str(root), *args])
    out, err = capsys.readouterr()
    return rc, out, err


# -- a. a clean run: everything shipped is stored ----------------------------------------------


@pytest.mark.kafka
def test_clean_run_is_complete(kafka, topic, tmp_path, capsys):
    root = tmp_path / "root"
    agent = Agent(kafka, topic)
    for value in lines(20):
        agent.data("f1", value)
    agent.watermark("f1")
    agent.close()
    run = consume(kafka, topic, root, lambda c: c["watermarks"] >= 1)
    size = len(agent.sent["f1"])
    assert size == 2000
    row = rows(root)["f1"]
    assert (row["shipped"], row["stored"], row["missing"], row["missing_bytes"], row["lost_bytes"]) == (
        size,
        size,
        [],
        0,
        0,
    )
    assert day_files(root) == {f"shop/portal.{D1}": bytes(agent.sent["f1"])}  # no watermark in it
    assert 'keplerlog_consumer_audit_missing_bytes{module="portal",service="shop"} 0.0' in run.scrape
    rc, out, _ = audit(capsys, root, "--day", D1)
    assert rc == 0 and "100.0000%" in out and out.rstrip().endswith("OK")


# -- b. records deleted from the topic before the consumer read them (retention) ---------------


@pytest.mark.kafka
def test_records_deleted_before_they_were_read_are_reported_exactly(kafka, topic, tmp_path, capsys):
    root = tmp_path / "root"
    agent = Agent(kafka, topic)
    values = lines(10)
    metas = [agent.data("f1" if i % 2 == 0 else "f2", v) for i, v in enumerate(values)]
    (partition,) = {m.partition for m in metas}
    cut = metas[5].offset  # records 0-4 go: f1's 0, 2, 4 = bytes [0, 300), f2's 1, 3 = [0, 200)
    admin = KafkaAdminClient(bootstrap_servers=kafka.admin_bootstrap)
    try:
        done = admin.delete_records({TopicPartition(topic, partition): cut})
    finally:
        admin.close()
    assert [m["low_watermark"] for m in done.values()] == [cut]  # the fault happened, on the broker
    agent.watermark("f1")
    agent.watermark("f2")
    agent.close()
    run = consume(kafka, topic, root, lambda c: c["watermarks"] >= 2)
    assert day_files(root) == {f"shop/portal.{D1}": b"".join(values[5:])}  # what was left, in order
    got = rows(root)
    assert (got["f1"]["missing"], got["f1"]["missing_bytes"], got["f1"]["stored"]) == ([[0, 300]], 300, 200)
    assert (got["f2"]["missing"], got["f2"]["missing_bytes"], got["f2"]["stored"]) == ([[0, 200]], 200, 300)
    assert got["f1"]["incomplete_since_ms"] is not None
    text = run.scrape
    assert 'keplerlog_consumer_audit_missing_bytes{module="portal",service="shop"} 500.0' in text
    assert 'keplerlog_consumer_audit_files_incomplete{module="portal",service="shop"} 2.0' in text
    rc, out, _ = audit(capsys, root, "--day", D1)
    assert rc == 1
    assert "missing 300 bytes at [0, 300)" in out and "missing 200 bytes at [0, 200)" in out
    rc, out, _ = audit(capsys, root, "--day", D1, "--json")
    total = json.loads(out)["total"]
    assert (total["shipped"], total["stored"], total["missing_bytes"], total["loss_rate"]) == (
        1000,
        500,
        500,
        0.5,
    )


@pytest.mark.kafka
def test_a_quarantined_data_record_is_missing_from_its_file(kafka, topic, tmp_path):
    """A record the consumer cannot file (a broken header) is acknowledged but in no day file."""
    root = tmp_path / "root"
    agent = Agent(kafka, topic)
    values = lines(3)
    agent.data("f1", values[0])
    b = Batch("shop", "portal", "h1", "/app/f1.log", "f1", 100, 1, DAY1)
    agent.raw(b.key(), [(k, b"x" if k == "kl.lines" else v) for k, v in b.headers()], values[1])
    agent.offsets["f1"] = 200
    agent.data("f1", values[2])
    agent.watermark("f1")
    agent.close()
    consume(kafka, topic, root, lambda c: c["watermarks"] >= 1)
    files = day_files(root)
    assert files.pop(f"shop/portal.{D1}") == values[0] + values[2]
    ((qname, qdata),) = files.items()
    assert qname.startswith("_quarantine/") and b"header kl.lines is not an integer" in qdata
    assert (rows(root)["f1"]["missing"], rows(root)["f1"]["stored"]) == ([[100, 200]], 200)


# -- c. bytes lost at the source, as the agent reports them -------------------------------------


@pytest.mark.kafka
def test_loss_at_the_source_counts_against_the_threshold(kafka, topic, tmp_path, capsys):
    root = tmp_path / "root"
    agent = Agent(kafka, topic)
    for value in lines(10):
        agent.data("f1", value)
    agent.watermark("f1", seen=1500, state="gone", lost=[(1000, 1500, "truncated")])
    agent.close()
    run = consume(kafka, topic, root, lambda c: c["watermarks"] >= 1)
    row = rows(root)["f1"]
    assert (row["missing_bytes"], row["stored"], row["lost"], row["lost_bytes"]) == (
        0,
        1000,
        [[1000, 1500, "truncated"]],
        500,
    )
    assert 'keplerlog_consumer_audit_source_lost_bytes{module="portal",service="shop"} 500.0' in run.scrape
    rc, out, _ = audit(capsys, root, "--day", D1, "--json")
    total = json.loads(out)["total"]
    assert rc == 1 and total["lost_bytes"] == 500 and total["loss_rate"] == pytest.approx(1 / 3)
    assert audit(capsys, root, "--day", D1, "--threshold", "0.5")[0] == 0


# -- d. silence: an agent that sent watermarks yesterday and none today -------------------------


@pytest.mark.kafka
def test_an_agent_silent_since_yesterday_is_a_finding(kafka, topic, tmp_path, capsys):
    root = tmp_path / "root"
    h1, h2 = Agent(kafka, topic, host="h1"), Agent(kafka, topic, host="h2")
    for agent in (h1, h2):
        agent.data("f1", lines(1)[0], ts=DAY0)
        agent.watermark("f1", ts=DAY0)
    h1.data("f1", lines(1)[0], ts=DAY1)
    h1.watermark("f1", ts=DAY1)  # h2 says nothing on day 1
    h1.close()
    h2.close()
    consume(kafka, topic, root, lambda c: c["watermarks"] >= 3)
    assert hosts(root, D0) == ["h1", "h2"] and hosts(root, D1) == ["h1"]  # the silence happened
    rc, out, _ = audit(capsys, root, "--day", D1, "--json")
    body = json.loads(out)
    assert rc == 1 and [(s["host"], s["service"]) for s in body["silent"]] == [("h2", "shop")]
    assert body["total"]["loss_rate"] == 0  # complete, yet not OK
    rc, out, _ = audit(capsys, root, "--day", D0)
    assert rc == 0  # nobody was heard on the day before day 0


# -- e. malformed and hostile watermarks ----------------------------------------------------------


@pytest.mark.kafka
def test_hostile_watermarks_are_quarantined_and_never_written(kafka, topic, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = sorted(str(p) for p in tmp_path.rglob("*"))
    agent = Agent(kafka, topic)
    values = lines(3)
    for value in values:
        agent.data("f1", value)
    good = Watermark("shop", "portal", "h1", "/app/f1.log", "f1", DAY1, 0, 300, 300)
    headers = dict(good.headers())
    hostile = [
        (good.key(), good.headers(), b'{"first": 0, "acked": '),  # bad JSON
        (b"shop/../x", list({**headers, "kl.module": b"../x"}.items()), good.value()),  # path attack
        (good.key(), list({**headers, "kl.path": b"/a" * 3000}.items()), good.value()),  # oversized path
        (good.key(), good.headers(), b'{"first":0,"seen":1,"acked":300,"lost":[[0,1,"stolen"]]}'),
        (good.key(), good.headers(), b"x" * 5000),  # over the watermark value bound
    ]
    for key, hdrs, value in hostile:
        agent.raw(key, hdrs, value)
    agent.watermark("f1")
    agent.close()
    run = Running(config(kafka, topic, root))
    try:
        run.wait(lambda c: c["quarantined"] >= len(hostile) and c["watermarks"] >= 1)
        assert run.thread.is_alive()
        later = Agent(kafka, topic)  # the consumer goes on with the next records
        later.offsets["f1"] = 300
        later.data("f1", b"after\n")
        later.watermark("f1")
        later.close()
        run.wait(lambda c: c["watermarks"] >= 2)
    finally:
        run.stop()
    assert sorted(str(p) for p in tmp_path.rglob("*") if not str(p).startswith(str(root) + "/")) == outside
    files = day_files(root)
    assert files.pop(f"shop/portal.{D1}") == b"".join(values) + b"after\n"  # data lines only
    ((qname, qdata),) = files.items()
    assert qname.startswith("_quarantine/") and qdata.count(b"#kl-quarantine reason=") == len(hostile)
    for reason in (
        b"watermark value is not JSON",
        b"unsafe service/module: name starts with a dot",
        b"header kl.path longer than 4096 bytes",
        b"watermark lost range malformed",
        b"watermark value empty or over 4096 bytes",
    ):
        assert reason in qdata, reason
    assert run.counts["unsafe_names"] == 1 and run.counts["watermarks"] == 2
    assert list(rows(root)) == ["f1"] and rows(root)["f1"]["stored"] == 306


# -- f. crash and replay give the same report ----------------------------------------------------


def _deleted_head_stream(kafka, topic, records=60, every=9):
    """Three files, the first 4 records deleted from the topic, a watermark of each file every
    `every` records (day 0 for the first half, day 1 after). Returns (partition, watermarks)."""
    agent = Agent(kafka, topic)
    metas, marks = [], 0
    for i in range(records):
        file_id = f"f{i % 3}"
        metas.append(agent.data(file_id, f"{file_id} line {i:04d}\n".encode()))
        if i % every == every - 1:
            for f in ("f0", "f1", "f2"):
                agent.watermark(f, ts=DAY0 + i if i < records // 2 else DAY1 + i)
                marks += 1
    (partition,) = {m.partition for m in metas}
    admin = KafkaAdminClient(bootstrap_servers=kafka.admin_bootstrap)
    try:
        done = admin.delete_records({TopicPartition(topic, partition): metas[4].offset})
    finally:
        admin.close()
    assert [m["low_watermark"] for m in done.values()] == [metas[4].offset]  # the head is gone
    for f in ("f0", "f1", "f2"):
        agent.watermark(f, ts=DAY1 + records)
        marks += 1
    agent.close()
    return partition, marks


def _reports(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in (root / ".keplerlog/audit").rglob("*.json")}


def _next_offset(root, topic, partition):
    path = root / ".keplerlog/state" / f"{topic}-partition-{partition}.json"
    try:
        return json.loads(path.read_bytes())["next_offset"] or 0
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.kafka
def test_a_replayed_partition_writes_the_same_report(kafka, topic, tmp_path):
    root = tmp_path / "root"
    partition, marks = _deleted_head_stream(kafka, topic)
    first = consume(kafka, topic, root, lambda c: c["watermarks"] >= marks)
    reports, data = _reports(root), day_files(root)
    assert set(reports) == {report_rel(D0, topic, partition), report_rel(D1, topic, partition)}
    got = rows(root)
    assert [got[f]["missing"] for f in ("f0", "f1", "f2")] == [[], [], []]  # day 1: after the head
    day0 = rows(root, D0)
    assert [day0[f]["missing_bytes"] for f in ("f0", "f1", "f2")] == [2 * 13, 13, 13]  # records 0-3
    # Rewind the partition to its start (everything after the deleted head is read again) and
    # remove the reports: the same reports come back, no line is written twice.
    state_path = root / ".keplerlog/state" / f"{topic}-partition-{partition}.json"
    state = json.loads(state_path.read_bytes())
    state["next_offset"] = 0
    state_path.write_text(json.dumps(state))
    for path in (root / ".keplerlog/audit").rglob("*.json"):
        path.unlink()
    second = consume(kafka, topic, root, lambda c: c["watermarks_replayed"] >= marks)
    assert second.counts["duplicate_records"] == 56  # the fault: every remaining record came again
    assert first.counts["watermarks"] == marks and second.counts["watermarks"] == 0
    assert _reports(root) == reports and day_files(root) == data


def _write_config(tmp_path, kafka, topic, root):
    cfg = {
        "kafka": {
            "bootstrap_servers": kafka.bootstrap,
            "topic": topic,
            "group_id": f"g-{topic}",
            "group_instance_id": "c1",  # a restarted process takes its place at once
            "session_timeout_ms": 6000,
            "max_poll_records": 5,  # many small batches: a kill lands inside the stream
        },
        "root": str(root),
        "ts_max_age_days": 100_000,
        "batch_max_wait_ms": 0,
        "metrics": {"port": 0, "log_interval_s": 1},
    }
    path = tmp_path / "consumer.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.kafka
def test_kill9_mid_stream_gives_the_same_reports_as_a_clean_run(kafka, topic, tmp_path):
    """A consumer process killed -9 three times while it reconciles: the final reports equal
    those of an undisturbed consumer of the same topic (another group, another root)."""
    partition, marks = _deleted_head_stream(kafka, topic, records=900, every=10)
    clean_root = tmp_path / "clean"
    consume(kafka, topic, clean_root, lambda c: c["watermarks"] >= marks, group_id=f"clean-{topic}")
    expected = _reports(clean_root)
    assert set(expected) == {report_rel(D0, topic, partition), report_rel(D1, topic, partition)}
    end = 900 + marks
    root = tmp_path / "root"
    cfg = _write_config(tmp_path, kafka, topic, root)
    log_path = tmp_path / "consumer.log"
    log = log_path.open("ab")
    cmd = [sys.executable, "-m", "keplerlog.consumer.main", "--config", str(cfg)]
    rng = random.Random(5)
    killed_at = []
    proc = None
    try:
        for _ in range(3):
            before = _next_offset(root, topic, partition)
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 60
            while _next_offset(root, topic, partition) <= before and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.1))  # somewhere in a batch: report, intent, state
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at.append(_next_offset(root, topic, partition))
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (
            _reports(root) != expected or _next_offset(root, topic, partition) < end
        ):
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        log.close()
    assert len(killed_at) == 3 and all(0 < at < end for at in killed_at), killed_at  # mid-stream
    assert _reports(root) == expected, log_path.read_text()[-3000:]
    assert day_files(root) == day_files(clean_root)


# -- g. the command line's usage errors -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--day", "20231301", "--root", "{root}"],
            "keplerlog-audit: --day '20231301' is not a date YYYYMMDD",
        ),
        (["--day", "20231114"], "keplerlog-audit: --root DIR (the consumer's data root) or --config"),
        (["--day", "20231114", "--root", "{root}/nope"], "is not a directory"),
        (["--day", "20231114", "--root", "{root}"], "keplerlog-audit: no reports for 20231114 in"),
    ],
)
def test_usage_errors_exit_2_with_one_line_and_no_traceback(tmp_path, args, message):
    env = {k: v for k, v in os.environ.items() if k != "KEPLERLOG_ROOT"}
    proc = subprocess.run(
        [sys.executable, "-m", "keplerlog.audit.main", *(a.format(root=tmp_path) for a in args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr, (
        proc.stderr
    )
