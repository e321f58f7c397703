"""Consumer processes under kill -9 and rebalances: every line exactly once, in order."""

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
from kafka import KafkaProducer

from keplerlog.kafkaauth import CLIENTS
from keplerlog.record import Batch

pytestmark = pytest.mark.kafka
DAY1 = 1_700_000_000_000  # 20231114 UTC
MODULES = ["portal", "billing", "search", "auth", "cart"]


class Source:
    """One simulated agent stream: a source file per module, sometimes re-sending a record."""

    def __init__(self, kafka, topic, records_per_module, seed):
        self.kafka, self.topic = kafka, topic
        self.n = records_per_module
        self.pause = 0.25
        self.rng = random.Random(seed)
        self.expected: dict[str, bytearray] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        producer = KafkaProducer(bootstrap_servers=self.kafka.bootstrap, acks="all", linger_ms=10)
        offsets = dict.fromkeys(MODULES, 0)
        last: dict[str, tuple] = {}
        for i in range(self.n):
            for module in MODULES:
                lines = self.rng.randint(1, 40)
                pad = b"x" * self.rng.randint(0, 200)
                value = b"".join(b"%s %06d-%02d %s\n" % (module.encode(), i, j, pad) for j in range(lines))
                ts = DAY1 + (86_400_000 if i >= self.n // 2 else 0)  # second half: next day
                b = Batch(
                    "shop", module, "h1", f"/app/{module}.log", f"id-{module}", offsets[module], lines, ts
                )
                producer.send(self.topic, value, key=b.key(), headers=b.headers())
                day = "20231114" if ts == DAY1 else "20231115"
                self.expected.setdefault(f"shop/{module}.{day}", bytearray()).extend(value)
                offsets[module] += len(value)
                if module in last and self.rng.random() < 0.1:  # agent replay after its own restart
                    pb, pv = last[module]
                    producer.send(self.topic, pv, key=pb.key(), headers=pb.headers())
                last[module] = (b, value)
            if i % 20 == 0:
                producer.flush()
                time.sleep(self.pause)
        producer.flush()
        producer.close()
        self.done.set()

    def total(self):
        return sum(len(v) for v in self.expected.values())


def write_config(tmp_path, kafka, topic, root, name="c.yml", instance=None, client="kafka-python"):
    cfg = {
        "kafka": {
            "client": client,
            "bootstrap_servers": kafka.bootstrap,
            "topic": topic,
            "group_id": f"g-{topic}",
            "session_timeout_ms": 6000,
            **({"group_instance_id": instance} if instance else {}),
        },
        "root": str(root),
        "ts_max_age_days": 100_000,  # the fixed 2023 timestamps stay on their own days
        "metrics": {"port": 0, "log_interval_s": 2},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


class Proc:
    def __init__(self, cfg, log_path):
        self.log = open(log_path, "ab")  # noqa: SIM115
        self.p = subprocess.Popen(
            [sys.executable, "-m", "keplerlog.consumer.main", "--config", str(cfg)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def kill9(self):
        os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait()

    def term(self, timeout=30):
        self.p.send_signal(signal.SIGTERM)
        rc = self.p.wait(timeout)
        self.log.close()
        return rc

    def ensure_dead(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def wait_log(path, needle, count, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text(errors="replace").count(needle) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} x{count} not in {path}")


def data_files(root):
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".keplerlog" not in p.parts
    }


def wait_complete(root, source, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if source.done.is_set() and sum(len(v) for v in data_files(root).values()) >= source.total():
            time.sleep(0.5)  # would reveal extra (duplicate) bytes
            return
        time.sleep(0.3)


def assert_exact(root, source, log_path):
    got = data_files(root)
    expected = {k: bytes(v) for k, v in source.expected.items()}
    for name in sorted(set(got) | set(expected)):
        assert got.get(name) == expected.get(name), (
            f"{name}: got {len(got.get(name, b''))} bytes, expected {len(expected.get(name, b''))}\n"
            + log_path.read_text()[-3000:]
        )


@pytest.mark.parametrize("client", CLIENTS)
def test_kill9_restart_no_loss_no_duplicates(kafka, topic, tmp_path, client):
    root = tmp_path / "root"
    # Static membership: the restarted process takes its predecessor's place without waiting
    # for the session timeout, which keeps this test short.
    cfg = write_config(tmp_path, kafka, topic, root, instance="c1", client=client)
    log_path = tmp_path / "consumer.log"
    source = Source(kafka, topic, records_per_module=400, seed=1)
    source.thread.start()
    proc = Proc(cfg, log_path)
    rng = random.Random(7)
    try:
        written = 0
        for _ in range(3):
            deadline = time.monotonic() + 40
            while sum(len(v) for v in data_files(root).values()) <= written and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 0.3))  # somewhere inside a batch: intent, append, state
            proc.kill9()
            written = sum(len(v) for v in data_files(root).values())
            proc = Proc(cfg, log_path)
        wait_log(log_path, "assigned [", 4)  # the last process is up (handlers installed)
        wait_complete(root, source, timeout=90)
        assert proc.term() == 0
    finally:
        proc.ensure_dead()
    assert_exact(root, source, log_path)
    assert "stopping:" in log_path.read_text()


@pytest.mark.parametrize("client", CLIENTS)
def test_rebalance_two_consumers_exactly_once(kafka, topic, tmp_path, client):
    root = tmp_path / "root"
    cfg = write_config(tmp_path, kafka, topic, root, client=client)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    source = Source(kafka, topic, records_per_module=300, seed=2)
    source.thread.start()
    a = Proc(cfg, log_a)
    b = None
    try:
        time.sleep(3)
        b = Proc(cfg, log_b)  # joins mid-stream: A's partitions are revoked and shared
        wait_log(log_b, "assigned [", 1)
        time.sleep(2)
        assert a.term() == 0  # leaves cleanly: B takes everything
        wait_complete(root, source, timeout=90)
        assert b.term() == 0
    finally:
        a.ensure_dead()
        if b:
            b.ensure_dead()
    assert_exact(root, source, log_b)
    assert "assigned" in log_b.read_text() and "revoked" in log_a.read_text()
