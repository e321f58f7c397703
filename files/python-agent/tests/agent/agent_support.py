"""Helpers for the agent tests: config files, the agent as a subprocess, reading the topic back."""

from __future__ import annotations

import os
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import yaml
from kafka import KafkaConsumer

from keplerlog.agent.config import load, parse
from keplerlog.agent.main import Agent
from keplerlog.agent.sender import Outcome
from keplerlog.record import Watermark, decode_headers, decode_watermark, is_watermark
from keplerlog.testing.kafka_node import free_port


def write_config(
    tmp: Path, bootstrap: str, topic: str, paths: list[str], client: str = "kafka-python", **over
) -> Path:
    inputs = over.pop("inputs", None) or [{"paths": paths}]
    doc = {
        "service": "shop",
        "module": "portal",
        "host": "test-host",
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "linger_ms": 5, "client": client},
        "state_file": str(tmp / "state" / "agent-state.json"),
        "inputs": inputs,
        "limits": {"close_inactive_s": 1, "partial_line_timeout_ms": 1000, "checkpoint_interval_ms": 100},
        "metrics": {"log_interval_s": 0},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key].update(value)
        else:
            doc[key] = value
    cfg = tmp / "agent.yml"
    cfg.write_text(yaml.safe_dump(doc))
    return cfg


def logs_and_config(tmp: Path, bootstrap: str, topic: str, client: str, **over) -> tuple[Path, int, Path]:
    """A fresh `logs` dir, a free metrics port, and a config following `logs/*.log` that serves
    its metrics there: (logs dir, port, config path). `over` as in `write_config`."""
    logdir = tmp / "logs"
    logdir.mkdir()
    port = free_port()
    metrics_over = {"port": port} | over.pop("metrics", {})
    cfg = write_config(tmp, bootstrap, topic, [str(logdir / "*.log")], client, metrics=metrics_over, **over)
    return logdir, port, cfg


class AgentProcess:
    """The agent run as `python -m keplerlog.agent.main` (as in production, one process)."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str, nofile: int | None = None) -> AgentProcess:
        """Start it; `nofile` sets its RLIMIT_NOFILE (soft and hard) first."""

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "keplerlog.agent.main", "--config", str(self.config), *extra],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=limit,
            )
        return self

    def open_fds(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class TopicReader:
    """Reads the topic back and rebuilds each file's bytes from (kl.file, kl.offset).

    Watermarks are kept apart (`marks`, in topic order), with where each record landed
    (`where`: partition and offset of every data record per file id, and of every watermark).
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = KafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        self.records: dict[str, list[tuple[int, bytes]]] = defaultdict(list)
        self.paths: dict[str, str] = {}
        self.batches: list = []
        self.marks: list[tuple[Watermark, int, int]] = []  # (watermark, partition, offset)
        self.where: dict[str, list[tuple[int, int]]] = defaultdict(list)  # data: (partition, offset)

    def poll(self, timeout_ms: int = 200) -> None:
        for msgs in self.consumer.poll(timeout_ms=timeout_ms).values():
            for m in msgs:
                if is_watermark(m.headers):
                    mark = decode_watermark(m.headers, m.value)
                    assert m.key == mark.key()
                    self.marks.append((mark, m.partition, m.offset))
                    continue
                batch = decode_headers(m.headers)
                assert m.key == batch.key()
                assert batch.offset >= 0
                self.batches.append((batch, m.value))
                self.records[batch.file_id].append((batch.offset, m.value))
                self.paths[batch.file_id] = batch.path
                self.where[batch.file_id].append((m.partition, m.offset))

    def marks_of(self, file_id: str) -> list[Watermark]:
        """The watermarks of one file id, in the order they were produced."""
        return [w for w, _, _ in sorted(self.marks, key=lambda x: (x[1], x[2])) if w.file_id == file_id]

    def content(self, file_id: str) -> bytes:
        """The file's bytes: records sorted by offset; replays must equal what they replay."""
        out = bytearray()
        for offset, value in sorted(self.records[file_id]):
            end = offset + len(value)
            if end <= len(out):
                assert out[offset:end] == value, f"replay differs at {offset}"
                continue
            assert offset <= len(out), f"gap in {file_id}: have {len(out)}, next record at {offset}"
            assert out[offset:] == value[: len(out) - offset], f"overlap differs at {offset}"
            out += value[len(out) - offset :]
        return bytes(out)

    def by_path(self) -> dict[str, list[bytes]]:
        """Rebuilt contents grouped by kl.path (a path can have several ids after truncation)."""
        grouped: dict[str, list[bytes]] = defaultdict(list)
        for fid, path in self.paths.items():
            grouped[path].append(self.content(fid))
        return grouped

    def wait_for(self, check: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            try:
                if check():
                    return
            except AssertionError:
                raise
            except Exception:
                pass
        self.poll()
        assert check(), "timed out waiting for the topic to contain the expected data"

    def wait_contents(self, expected: dict[str, list[bytes]], timeout: float = 30) -> None:
        def check() -> bool:
            got = self.by_path()
            return all(sorted(got.get(p, [])) == sorted(v) for p, v in expected.items())

        try:
            self.wait_for(check, timeout)
        except AssertionError:
            got = {p: [len(x) for x in v] for p, v in self.by_path().items()}
            want = {p: [len(x) for x in v] for p, v in expected.items()}
            raise AssertionError(f"topic content mismatch: got lengths {got}, want {want}") from None

    def close(self) -> None:
        self.consumer.close()


def metrics(port: int) -> dict[str, float]:
    """The agent's metrics by name; a per-file one by its name and labels (`name{path=...}`)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as fh:
        fh.write(data)
        fh.flush()


def lines(prefix: str, n: int, start: int = 0, width: int = 60) -> bytes:
    return b"".join(f"{prefix} {i:08d} ".ljust(width, "x").encode() + b"\n" for i in range(start, start + n))


# -- the agent in process, with a sender that acknowledges only what the test says ----------


class FakeSender:
    """Stands in for `Sender`: keeps every record; acknowledges on request (or at once).

    Data records go to `sent`, watermarks (decoded) to `marks`, acknowledged at once when
    `auto_ack` (else `ack_marks`): the tests of data records never see them.
    """

    def __init__(self, wake, *, auto_ack: bool) -> None:
        self.results: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self.sent: list[tuple[bytes, tuple]] = []
        self.marks: list[Watermark] = []
        self.mark_tokens: list = []
        self.connected = False
        self.broken = False
        self._wake = wake
        self._auto = auto_ack

    def connect(self, bootstrap_timeout_ms: int = 5000) -> bool:
        self.connected = True
        return True

    @property
    def broker_connected(self) -> bool:
        return self.connected

    def send(self, value: bytes, key: bytes, headers: list, token: tuple) -> None:
        if is_watermark(headers):
            mark = decode_watermark(headers, value)
            assert key == mark.key()
            self.marks.append(mark)
            if not self._auto:
                self.mark_tokens.append(token)
        else:
            self.sent.append((value, token))
        if self._auto:
            self.results.put(Outcome(token, None))
            self._wake()

    def ack(self, index: int, error: BaseException | None = None) -> None:
        self.results.put(Outcome(self.sent[index][1], error))
        self._wake()

    def ack_marks(self, error: BaseException | None = None) -> None:
        """Report an outcome for every watermark not reported yet."""
        for token in self.mark_tokens:
            self.results.put(Outcome(token, error))
        self.mark_tokens.clear()
        self._wake()

    def poke(self) -> None:
        pass

    def flush(self, timeout: float) -> bool:
        return not self._auto

    def close(self, timeout: float = 0) -> None:
        self.connected = False


def in_process(
    tmp_path: Path,
    logdir: Path,
    *,
    auto_ack: bool,
    paths: list[str] | None = None,
    watermarks: dict | None = None,
    **limits,
) -> tuple[Agent, FakeSender]:
    over = {"watermarks": watermarks} if watermarks is not None else {}
    cfg_path = write_config(
        tmp_path,
        "127.0.0.1:1",
        "t",
        paths or [str(logdir / "*.log")],
        limits={"shutdown_timeout_s": 1, "read_coalesce_ms": 0, **limits},
        kafka={"max_record_bytes": 65536},
        **over,
    )
    agent = Agent(load(str(cfg_path)))
    sender = FakeSender(agent.waker.wake, auto_ack=auto_ack)
    agent.sender = sender  # type: ignore[assignment]
    return agent, sender


def first_pass(agent: Agent, sender: FakeSender) -> None:
    """Connect, scan, read every file once and apply the outcomes (an in-process agent's start)."""
    sender.connect()
    agent.fileset.scan(time.monotonic())
    agent.reader.read_all(time.time(), time.monotonic())
    agent.ledger.results()


class LiveWriter(threading.Thread):
    """The application: 200 lines/s (20 every 100 ms) into one file until `done` is set."""

    def __init__(self, path: Path, width: int = 100) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.width = width
        self.done = threading.Event()
        self.n = 0

    def run(self) -> None:
        while not self.done.is_set():
            append(self.path, lines("live", 20, self.n, width=self.width))
            self.n += 20
            time.sleep(0.1)


# -- rotations against the agent in process: the rig of test_agent_rotation_*.py ----------


LOGROTATE = "/usr/sbin/logrotate"
COPYTRUNCATE_DC = "copytruncate\n  rotate 5\n  compress\n  delaycompress"


class Producer:
    """The fake producer: data records wait in `sent` until `complete` (or a crash) settles them."""

    connected = True
    broken = False
    broker_connected = True

    def __init__(self, shipped: dict[str, list[tuple[int, bytes]]]) -> None:
        self.results: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self.sent: list[tuple[bytes, tuple]] = []
        self.shipped = shipped  # what reached the topic: file id -> (offset, value)

    def connect(self, bootstrap_timeout_ms: int = 5000) -> bool:
        return True

    def send(self, value: bytes, key: bytes, headers: list, token: object) -> None:
        if type(token) is not tuple:  # a watermark: not what these tests count
            self.results.put(Outcome(token, None))
            return
        self.sent.append((value, token))

    def complete(self) -> None:
        for value, token in self.sent:
            self.shipped[token[1].file_id].append((token[2], value))
            self.results.put(Outcome(token, None))
        self.sent.clear()

    def crash(self, *, delivered: bool) -> None:
        """kill -9: the records in flight reach the topic (or not); no outcome comes back."""
        if delivered:
            for value, token in self.sent:
                self.shipped[token[1].file_id].append((token[2], value))
        self.sent.clear()

    def poke(self) -> None:
        pass

    def flush(self, timeout: float) -> bool:
        return True

    def close(self, timeout: float = 0) -> None:
        pass


class Rig:
    """One log file, its rotations, the agent in process, and the ground truth."""

    def __init__(
        self,
        tmp: Path,
        *,
        pattern: str,
        rotate: str = COPYTRUNCATE_DC,
        close_inactive_s: float = 300,
        **limits: int,
    ):
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.log = self.logs / "portal.log"
        self.log.touch()
        self.conf = tmp / "logrotate.conf"
        self.conf.write_text(f"{self.log} {{\n  {rotate}\n  missingok\n}}\n")
        os.chmod(self.conf, 0o644)
        self.cfg = parse(
            {
                "service": "shop",
                "kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "t", "max_record_bytes": 1024},
                "state_file": str(tmp / "state" / "s.json"),
                "inputs": [{"paths": [str(self.logs / pattern)]}],
                "limits": {"close_inactive_s": close_inactive_s, "close_idle_s": 300, **limits},
            },
            env={},
        )
        self.shipped: dict[str, list[tuple[int, bytes]]] = defaultdict(list)
        self.generations: list[bytearray] = []
        self._generation_of: dict[int, int] = {}  # inode -> index, while not truncated
        self.lines = 0
        self.lost = 0
        self.start()

    # -- the agent --------------------------------------------------------------------------
    def start(self) -> None:
        self.agent = Agent(self.cfg, use_inotify=False)
        self.producer = Producer(self.shipped)
        self.agent.sender = self.producer  # type: ignore[assignment]

    def scan(self) -> None:
        self.agent.fileset.scan(time.monotonic())

    def read(self) -> None:
        self.agent.reader.read_all(time.time(), time.monotonic())

    def ack(self) -> None:
        self.producer.complete()
        self.agent.ledger.results()

    def checkpoint(self) -> None:
        self.agent.fileset.checkpoint()

    def _close(self) -> None:
        self.lost += self.agent.counters.lost_bytes
        for f in self.agent.files.values():
            f.close()
        self.agent.watcher.close()
        self.agent.waker.close()

    def stop(self) -> None:
        """A graceful stop, as the agent's shutdown drains: scan, read to the end, final state."""
        self.scan()
        for _ in range(3):
            self.read()
            self.ack()
        self.agent.reader.flush_all()
        self.ack()
        self.agent.fileset.checkpoint(final=True)
        self._close()

    def kill(self, *, delivered: bool) -> None:
        self.producer.crash(delivered=delivered)
        self._close()

    def drain(self) -> None:
        """Everything to its end, files closed: what a long-running agent gets to."""
        for _ in range(4):
            self.agent.ledger.results()
            self.scan()
            for _ in range(3):
                self.read()
                self.ack()
            self.agent.reader.flush_timed_out(time.time() + 100, time.monotonic() + 100)
            self.ack()
            self.agent.fileset.finish_detached(time.monotonic() + 1000)
        self.ack()

    # -- the application and logrotate ---------------------------------------------------------
    def write(self, n: int, path: Path | None = None) -> None:
        """The application writes `n` lines to the log, or to `path` (a writer that kept its
        descriptor across a rename appends to the rotated file)."""
        data = b"".join(
            f"L{self.lines + i:07d} ".ljust(59, "abcdefghij"[i % 10]).encode() + b"\n" for i in range(n)
        )
        self.lines += n
        with (path or self.log).open("ab") as fh:
            fh.write(data)
            ino = os.fstat(fh.fileno()).st_ino
        index = self._generation_of.setdefault(ino, len(self.generations))
        if index == len(self.generations):
            self.generations.append(bytearray())
        self.generations[index] += data

    def _truncated(self) -> None:
        st = os.stat(self.log)
        index = self._generation_of.get(st.st_ino)
        if index is not None and st.st_size < len(self.generations[index]):
            del self._generation_of[st.st_ino]  # the next write starts a new generation

    def logrotate(self) -> None:
        subprocess.run(
            [LOGROTATE, "-f", "-s", str(self.tmp / "logrotate.state"), str(self.conf)],
            check=True,
            capture_output=True,
        )
        self._truncated()

    # -- the verdict ---------------------------------------------------------------------------
    def check(self, *, counted_loss: bool = False) -> None:
        """Each id one generation; no generation under two ids; nothing missing, nothing counted lost.

        `counted_loss`: bytes may be missing if the agent counted at least as many lost (a kill
        while unacknowledged bytes were only in a rotated file deleted since): never silently.
        """
        written = [bytes(g) for g in self.generations if g]
        owners: dict[int, list[str]] = defaultdict(list)
        covered: dict[int, set[int]] = defaultdict(set)
        for file_id, records in self.shipped.items():
            match = [i for i, g in enumerate(written) if all(g[o : o + len(v)] == v for o, v in records)]
            assert match, f"{file_id}: shipped bytes that were never written at those offsets"
            owners[match[0]].append(file_id)
            for offset, value in records:
                covered[match[0]].update(range(offset, offset + len(value)))
        duplicated = {i: ids for i, ids in owners.items() if len(ids) > 1}
        missing = {i: len(g) - len(covered[i]) for i, g in enumerate(written) if len(covered[i]) < len(g)}
        lost = self.lost + self.agent.counters.lost_bytes
        if counted_loss:
            assert duplicated == {} and sum(missing.values()) <= lost, (duplicated, missing, lost)
        else:
            assert (duplicated, missing, lost) == ({}, {}, 0)

    def close(self) -> None:
        self._close()
