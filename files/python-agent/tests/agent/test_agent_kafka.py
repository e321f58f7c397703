"""The agent against a real Kafka broker (the session `kafka` fixture)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from agent_support import AgentProcess, append, lines, write_config

pytestmark = pytest.mark.kafka


def _agent(tmp_path, kafka, topic, logdir, client, **over) -> AgentProcess:
    cfg = write_config(tmp_path, kafka.bootstrap, topic, [str(logdir / "*.log")], client, **over)
    return AgentProcess(cfg, tmp_path / "agent.out")


def _state(tmp_path) -> dict:
    return json.loads((tmp_path / "state" / "agent-state.json").read_text())["files"]


def test_ships_existing_and_later_files_and_sigterm_drains(tmp_path, kafka, topic, logdir, reader, client):
    a = logdir / "a.log"
    a.write_bytes(lines("a", 1000))
    agent = _agent(tmp_path, kafka, topic, logdir, client).start()
    try:
        reader.wait_contents({str(a): [a.read_bytes()]})
        b = logdir / "b.log"
        append(b, lines("b", 10))
        append(a, lines("a", 10, 1000))
        reader.wait_contents({str(a): [a.read_bytes()], str(b): [b.read_bytes()]})
        append(b, b"partial line without newline")
        time.sleep(0.3)
    finally:
        assert agent.stop() == 0, agent.output()
    reader.wait_contents({str(b): [b.read_bytes()]})
    state = _state(tmp_path)
    assert sorted(v["offset"] for v in state.values()) == sorted([a.stat().st_size, b.stat().st_size])


def test_rename_and_create_rotation(tmp_path, kafka, topic, logdir, reader, client):
    log = logdir / "app.log"
    append(log, lines("r1", 500))
    agent = _agent(tmp_path, kafka, topic, logdir, client).start()
    try:
        reader.wait_contents({str(log): [log.read_bytes()]})
        # The writer keeps its descriptor: lines written after the rename land in the old file.
        with log.open("ab") as writer:
            writer.write(lines("r1", 200, 500))
            writer.flush()
            os.rename(log, logdir / "app.log.1")
            writer.write(lines("r1", 300, 700))
        old = (logdir / "app.log.1").read_bytes()
        append(log, lines("r2", 100))
        reader.wait_contents({str(log): [old, log.read_bytes()]})
    finally:
        assert agent.stop() == 0, agent.output()
    assert "rotated" in agent.output()


def test_copytruncate_and_truncation_regrown_beyond_offset(tmp_path, kafka, topic, logdir, reader, client):
    log = logdir / "app.log"
    first = lines("before", 300)
    append(log, first)
    agent = _agent(tmp_path, kafka, topic, logdir, client).start()
    try:
        reader.wait_contents({str(log): [first]})
        # copytruncate: copy aside (not followed: *.log only), truncate in place, keep writing.
        (logdir / "app.log.1").write_bytes(log.read_bytes())
        os.truncate(log, 0)
        second = lines("after", 10)
        append(log, second)
        reader.wait_contents({str(log): [first, second]})
        # Truncate and grow back *beyond* the old offset faster than the agent looks:
        # only the fingerprint of the first bytes can tell.
        agent.signal(signal.SIGSTOP)
        with log.open("r+b") as fh:
            fh.truncate(0)
            third = lines("rewritten", 400)
            fh.write(third)
        agent.signal(signal.SIGCONT)
        reader.wait_contents({str(log): [first, second, third]})
    finally:
        assert agent.stop() == 0, agent.output()


def test_kill_9_and_restart_loses_nothing(tmp_path, kafka, topic, logdir, reader, client):
    log = logdir / "app.log"
    agent = _agent(tmp_path, kafka, topic, logdir, client).start()
    written = bytearray(lines("k", 500))
    append(log, bytes(written))
    reader.wait_for(lambda: bool(reader.records))
    state_file = tmp_path / "state" / "agent-state.json"
    deadline = time.monotonic() + 10
    while not state_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    for i in range(20):  # kill -9 while lines are still being written and shipped
        chunk = lines(f"k{i}", 500)
        append(log, chunk)
        written += chunk
        time.sleep(0.01)
    agent.signal(signal.SIGKILL)
    agent.wait()
    more = lines("while-down", 2000)
    append(log, more)
    written += more
    agent = AgentProcess(agent.config, tmp_path / "agent2.out").start()
    try:
        reader.wait_contents({str(log): [bytes(written)]})
        # At least once: the restart resumed from a checkpoint (not from 0), same file id.
        assert len(reader.records) == 1
    finally:
        assert agent.stop() == 0, agent.output()
    assert "from offset 0" not in agent.output()


def test_long_lines_binary_and_partial_lines(tmp_path, kafka, topic, logdir, reader, client):
    log = logdir / "bin.log"
    long_line = b"L" * 200_000 + b"\n"
    binary = b"nul\x00byte \xff\xfe invalid utf-8 \xc3\x28\n" + bytes(range(256)).replace(b"\n", b"") + b"\n"
    append(log, b"short\n" + long_line + binary + b"no newline yet")
    agent = _agent(tmp_path, kafka, topic, logdir, client, limits={"max_line_bytes": 65536}).start()
    try:
        reader.wait_contents({str(log): [log.read_bytes()]}, timeout=30)
        append(log, b" ... done\n")
        reader.wait_contents({str(log): [log.read_bytes()]})
    finally:
        assert agent.stop() == 0, agent.output()
    pieces = [v for b, v in reader.batches if not v.endswith(b"\n")]
    # 200 KB line: three 64 KiB pieces (the rest ends with its newline), plus the timed-out partial.
    assert [len(v) for v in pieces] == [65536, 65536, 65536, len(b"no newline yet")]
    assert [b.lines for b, v in reader.batches if not v.endswith(b"\n")] == [1, 1, 1, 1]


def test_multiline_events_stay_in_one_record(tmp_path, kafka, topic, logdir, reader, client):
    log = logdir / "java.log"
    events = []
    for i in range(50):
        ev = f"2024-05-01 10:00:{i:02d} ERROR boom {i}\n".encode()
        ev += b"".join(f"\tat com.example.Foo.bar(Foo.java:{j})\n".encode() for j in range(i % 7))
        events.append(ev)
    agent = _agent(
        tmp_path,
        kafka,
        topic,
        logdir,
        client,
        one_line_per_record=True,
        inputs=[
            {
                "paths": [str(logdir / "*.log")],
                "multiline": {"start": r"^\d{4}-\d{2}-\d{2}", "max_lines": 100, "timeout_ms": 300},
            }
        ],
    ).start()
    try:
        for ev in events:
            append(log, ev)
        reader.wait_contents({str(log): [b"".join(events)]})
    finally:
        assert agent.stop() == 0, agent.output()
    assert sorted(v for _, v in reader.batches) == sorted(events)
    assert [b.lines for b, v in reader.batches] == [v.count(b"\n") for _, v in reader.batches]


def test_both_clients_put_a_key_on_the_same_partition(kafka, topic):
    """librdkafka with the agent's settings hashes a key as kafka-python (and Java) does, so a
    module stays on one partition while a fleet switches clients host by host."""
    from confluent_kafka import Producer
    from kafka.partitioner.default import murmur2

    from keplerlog.agent import rdsender
    from keplerlog.agent.config import parse

    cfg = parse(
        {
            "service": "shop",
            "state_file": "/var/lib/keplerlog/state.json",
            "inputs": [{"paths": ["/app/logs/*.log"]}],
            "kafka": {"bootstrap_servers": kafka.bootstrap, "topic": topic, "client": "librdkafka"},
        },
        env={},
    )
    producer = Producer(rdsender.client_config(cfg, lambda _e: None))
    keys = [f"shop/module-{i}".encode() for i in range(40)]
    landed: dict[bytes, int] = {}
    for key in keys:
        producer.produce(
            topic, value=b"x\n", key=key, on_delivery=lambda e, m: landed.__setitem__(m.key(), m.partition())
        )
    assert producer.flush(30) == 0
    expected = {key: (murmur2(key) & 0x7FFFFFFF) % 4 for key in keys}
    assert len(set(expected.values())) == 4  # the keys cover every partition: a wrong hash shows
    assert landed == expected


def test_the_librdkafka_agent_ships_without_tls_asyncio_or_libcrypto_loaded(
    tmp_path, kafka, topic, logdir, reader
):
    """Connected and shipping over plaintext, the agent has not loaded what only other paths
    need: the ~9 MB of resident memory that confluent-kafka's package init (via list_topics),
    hashlib and prometheus_client's exposition used to add (lazyinit, ask_cluster, identity)."""
    a = logdir / "a.log"
    a.write_bytes(lines("a", 2000))
    agent = _agent(tmp_path, kafka, topic, logdir, "librdkafka").start()
    try:
        reader.wait_contents({str(a): [a.read_bytes()]})  # connected, shipped, acknowledged
        assert agent.proc is not None
        text = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        maps = {line.rsplit("/", 1)[-1] for line in text.splitlines() if "/" in line}
    finally:
        assert agent.stop() == 0, agent.output()
    assert any(m.startswith("librdkafka") for m in maps)  # the maps are the agent's: its client
    loaded = sorted(m for m in maps if m.startswith(("_ssl.", "_hashlib.", "_asyncio.", "libcrypto.so")))
    assert loaded == [], loaded
