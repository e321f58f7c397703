"""Start and stop a real single-node (or three-node) KRaft Kafka from `dist/kafka/*.tgz`.

Used by the pytest fixtures and by `make bench`, so that every test talks to a real broker
without Docker. The archive comes from `make kafka-dist`; KEPLERLOG_KAFKA_DIST overrides it.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[4]


def find_dist() -> Path:
    """Locate the Kafka distribution archive built by `make kafka-dist`."""
    env = os.environ.get("KEPLERLOG_KAFKA_DIST")
    if env:
        return Path(env)
    found = sorted((REPO_ROOT / "dist" / "kafka").glob("kafka_*.tgz"))
    if not found:
        raise FileNotFoundError("no Kafka distribution in dist/kafka: run `make kafka-dist`")
    return found[-1]


def free_port() -> int:
    """Ask the kernel for a free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cluster_id() -> str:
    """Make a random KRaft cluster id; one starting with "-" would be read as an option."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _unpack(dist: Path, into: Path) -> Path:
    with tarfile.open(dist) as tar:
        tar.extractall(into, filter="tar")
    (home,) = [p for p in into.iterdir() if p.is_dir()]
    return home


@dataclass
class KafkaNode:
    """One KRaft node (broker and controller) of a local test cluster."""

    home: Path
    workdir: Path
    node_id: int
    port: int
    controller_port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        """The broker's PLAINTEXT address."""
        return f"127.0.0.1:{self.port}"

    def write_config(self, voters: str, replication: int) -> Path:
        """Write server.properties for this node."""
        cfg = self.workdir / "server.properties"
        cfg.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    f"node.id={self.node_id}",
                    f"controller.quorum.voters={voters}",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    f"log.dirs={self.workdir / 'data'}",
                    f"offsets.topic.replication.factor={replication}",
                    f"transaction.state.log.replication.factor={replication}",
                    "transaction.state.log.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "num.partitions=4",
                    "auto.create.topics.enable=true",
                    "",
                ]
            )
        )
        return cfg

    def format(self, cluster_id: str) -> None:
        """Format the node's log dir (once, on a fresh workdir)."""
        subprocess.run(
            [
                str(self.home / "bin" / "kafka-storage"),
                "format",
                "-t",
                cluster_id,
                "-c",
                str(self.workdir / "server.properties"),
            ],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        """Start the broker in the background; its output goes to workdir/server.log."""
        log = (self.workdir / "server.log").open("ab")
        env = {**os.environ, "KAFKA_HEAP_OPTS": "-Xmx384m -Xms384m"}
        self.process = subprocess.Popen(
            [str(self.home / "bin" / "kafka-server-start"), str(self.workdir / "server.properties")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Stop the broker (SIGKILL after `timeout`)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class KafkaCluster:
    """A local KRaft cluster of `size` combined nodes, each a separate JVM on loopback."""

    def __init__(self, workdir: Path, size: int = 1, dist: Path | None = None) -> None:
        self.workdir = workdir
        self.size = size
        home_dir = workdir / "dist"
        home_dir.mkdir(parents=True, exist_ok=True)
        self.home = _unpack(dist or find_dist(), home_dir)
        self.nodes = [
            KafkaNode(self.home, workdir / f"node{i}", i, free_port(), free_port())
            for i in range(1, size + 1)
        ]

    @property
    def bootstrap(self) -> str:
        """Comma-separated bootstrap list of all nodes."""
        return ",".join(node.bootstrap for node in self.nodes)

    def start(self, timeout: float = 90) -> None:
        """Format and start every node, then wait until the cluster answers metadata requests."""
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        cluster_id = _cluster_id()
        for node in self.nodes:
            node.workdir.mkdir(parents=True, exist_ok=True)
            node.write_config(voters, min(self.size, 3))
            node.format(cluster_id)
        for node in self.nodes:
            node.start()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 90) -> None:
        """Block until every broker is registered (or raise with the tail of a broker log)."""
        from kafka import KafkaAdminClient  # imported late: only the fixtures need it
        from kafka.errors import KafkaError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
                try:
                    brokers = admin.describe_cluster()["brokers"]
                finally:
                    admin.close()
                if len(brokers) == self.size:
                    return
            except (KafkaError, OSError):
                pass
            time.sleep(0.5)
        tail = (self.nodes[0].workdir / "server.log").read_text(errors="replace")[-3000:]
        raise TimeoutError(f"Kafka did not come up within {timeout}s:\n{tail}")

    def create_topic(self, name: str, partitions: int = 4, replication: int | None = None) -> None:
        """Create a topic and wait until it has leaders."""
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            admin.create_topics([NewTopic(name, partitions, replication or min(self.size, 2))])
        finally:
            admin.close()

    def stop(self) -> None:
        """Stop all nodes."""
        for node in self.nodes:
            node.stop()

    def destroy(self) -> None:
        """Stop all nodes and remove their data."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
