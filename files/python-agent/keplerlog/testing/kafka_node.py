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

from keplerlog.testing.pki import Pki, make_pki

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


def _listening(port: int) -> bool:
    """Tell whether something accepts connections on a loopback port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


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
    # secure nodes: clients use SASL_SSL (SCRAM) on `port`; the broker itself and the fixture's
    # admin client a loopback PLAINTEXT listener on `internal_port` (User:ANONYMOUS, a super user)
    pki: Pki | None = None
    internal_port: int = 0
    # more server.properties lines ("key=value"), after the fixture's own
    settings: tuple[str, ...] = ()

    @property
    def bootstrap(self) -> str:
        """The clients' address (PLAINTEXT, or SASL_SSL on a secure node)."""
        return f"127.0.0.1:{self.port}"

    @property
    def admin_bootstrap(self) -> str:
        """The fixture's own address: PLAINTEXT (on a secure node, its internal listener)."""
        return f"127.0.0.1:{self.internal_port or self.port}"

    def _listener_lines(self) -> list[str]:
        if self.pki is None:
            return [
                f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            ]
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        return [
            f"listeners=CLIENT://127.0.0.1:{self.port},INTERNAL://127.0.0.1:{self.internal_port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=CLIENT://127.0.0.1:{self.port},INTERNAL://127.0.0.1:{self.internal_port}",
            "listener.security.protocol.map=CLIENT:SASL_SSL,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=INTERNAL",
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={self.pki.keystore}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={self.pki.ca}",
            "sasl.enabled.mechanisms=SCRAM-SHA-512",
            # as roles/kafka (vars/main.yml): clients read why a login failed before the close
            "connection.failed.authentication.delay.ms=1000",
            f"listener.name.client.scram-sha-512.sasl.jaas.config={scram}",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found=false",
            "super.users=User:ANONYMOUS",
        ]

    def write_config(self, voters: str, replication: int) -> Path:
        """Write server.properties for this node."""
        cfg = self.workdir / "server.properties"
        cfg.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    f"node.id={self.node_id}",
                    f"controller.quorum.voters={voters}",
                    *self._listener_lines(),
                    "controller.listener.names=CONTROLLER",
                    f"log.dirs={self.workdir / 'data'}",
                    f"offsets.topic.replication.factor={replication}",
                    f"transaction.state.log.replication.factor={replication}",
                    "transaction.state.log.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "num.partitions=4",
                    "auto.create.topics.enable=true",
                    *self.settings,
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

    def __init__(
        self,
        workdir: Path,
        size: int = 1,
        dist: Path | None = None,
        *,
        secure: bool = False,
        settings: tuple[str, ...] = (),
    ) -> None:
        """Unpack Kafka and plan `size` nodes; nothing runs before `start()`.

        `secure`: clients must speak SASL_SSL with SCRAM-SHA-512 and the StandardAuthorizer
        denies what no ACL allows (see `add_user`, `allow`, `client_kwargs`), as in production.
        `settings`: more server.properties lines for every node (a benchmark's broker tuning).
        """
        self.workdir = workdir
        self.size = size
        home_dir = workdir / "dist"
        home_dir.mkdir(parents=True, exist_ok=True)
        self.home = _unpack(dist or find_dist(), home_dir)
        self.pki = make_pki(workdir / "pki") if secure else None
        self.nodes = [
            KafkaNode(
                self.home,
                workdir / f"node{i}",
                i,
                free_port(),
                free_port(),
                pki=self.pki,
                internal_port=free_port() if secure else 0,
                settings=settings,
            )
            for i in range(1, size + 1)
        ]

    @property
    def bootstrap(self) -> str:
        """Comma-separated bootstrap list of all nodes (the clients' listener)."""
        return ",".join(node.bootstrap for node in self.nodes)

    @property
    def admin_bootstrap(self) -> str:
        """Bootstrap list of the fixture's own PLAINTEXT listeners (a super user when secure)."""
        return ",".join(node.admin_bootstrap for node in self.nodes)

    def client_kwargs(self, user: str, password: str, cafile: Path | None = None) -> dict[str, object]:
        """kafka-python arguments of a SASL_SSL client of this (secure) cluster."""
        assert self.pki is not None, "client_kwargs: the cluster is not secure"
        return {
            "security_protocol": "SASL_SSL",
            "ssl_cafile": str(cafile or self.pki.ca),
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": user,
            "sasl_plain_password": password,
        }

    def add_user(self, name: str, password: str) -> None:
        """Create (or update) a SCRAM-SHA-512 user of a secure cluster."""
        from kafka import KafkaAdminClient
        from kafka.admin import ScramMechanism, UserScramCredentialUpsertion

        admin = KafkaAdminClient(bootstrap_servers=self.admin_bootstrap)
        try:
            admin.alter_user_scram_credentials(
                [UserScramCredentialUpsertion(name, ScramMechanism.SCRAM_SHA_512, password)]
            )
        finally:
            admin.close()

    def allow(self, user: str, operation: str, resource: str, name: str) -> None:
        """Add an ALLOW ACL for a user: operation WRITE / READ / ..., resource TOPIC / GROUP / ..."""
        from kafka import KafkaAdminClient
        from kafka.admin import (
            ACL,
            ACLOperation,
            ACLPermissionType,
            ACLResourcePatternType,
            ResourcePattern,
            ResourceType,
        )

        admin = KafkaAdminClient(bootstrap_servers=self.admin_bootstrap)
        try:
            admin.create_acls(
                [
                    ACL(
                        principal=f"User:{user}",
                        host="*",
                        operation=ACLOperation[operation],
                        permission_type=ACLPermissionType.ALLOW,
                        resource_pattern=ResourcePattern(
                            ResourceType[resource], name, ACLResourcePatternType.LITERAL
                        ),
                    )
                ]
            )
        finally:
            admin.close()

    def start(self, timeout: float = 90) -> None:
        """Format and start every node, then wait until the cluster answers metadata requests."""
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        for node in self.nodes:
            node.workdir.mkdir(parents=True, exist_ok=True)
            node.write_config(voters, min(self.size, 3))
        self._format()
        self.boot(timeout)

    def _format(self) -> None:
        cluster_id = _cluster_id()
        for node in self.nodes:
            node.format(cluster_id)

    def boot(self, timeout: float = 90) -> None:
        """Start every (formatted, stopped) node on its ports and wait until the cluster is ready.

        After `stop()` this is a restart of the whole cluster on the same storage; after
        `stop()` + `wipe()` the clients find brand-new brokers at the old addresses.
        """
        for node in self.nodes:
            node.start()
        self.wait_ready(timeout)

    def wipe(self) -> None:
        """Replace every stopped node by an empty one: its storage deleted, formatted afresh.

        All broker state is lost, as when a cluster is rebuilt from scratch at the same
        addresses: topics, records, committed offsets and idempotent producers' sequences. The
        new storage gets a new cluster id. Call `boot()` next; topics must be created again.
        """
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                raise RuntimeError(f"node {node.node_id} is running: stop() it before wipe()")
            shutil.rmtree(node.workdir / "data", ignore_errors=True)
        self._format()

    def wait_ready(self, timeout: float = 90) -> None:
        """Block until every broker is registered (or raise with the tail of a broker log)."""
        from kafka import KafkaAdminClient  # imported late: only the fixtures need it
        from kafka.errors import KafkaError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not all(
                _listening(node.port) and _listening(node.internal_port or node.port) for node in self.nodes
            ):
                # an admin client started before the port is open backs off up to ~30 s
                time.sleep(0.2)
                continue
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.admin_bootstrap, request_timeout_ms=5000)
                try:
                    brokers = admin.describe_cluster()["brokers"]
                finally:
                    admin.close()
                if len(brokers) == self.size:
                    return
            except (KafkaError, OSError):
                pass
            time.sleep(0.5)
        log_file = self.nodes[0].workdir / "server.log"
        try:
            tail = log_file.read_text(errors="replace")[-3000:]
        except OSError as exc:  # the timeout is the error to report, not a missing log
            tail = f"({log_file}: {exc.strerror or exc})"
        raise TimeoutError(f"Kafka did not come up within {timeout}s:\n{tail}")

    def create_topic(
        self,
        name: str,
        partitions: int = 4,
        replication: int | None = None,
        *,
        configs: dict[str, str] | None = None,
        exist_ok: bool = False,
    ) -> None:
        """Create a topic and wait until it has leaders.

        `configs`: topic-level settings (e.g. `max.message.bytes`). `exist_ok`: a topic of that
        name may exist already (a producer's metadata request may have auto-created it first,
        e.g. right after `wipe()` + `boot()`).
        """
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(bootstrap_servers=self.admin_bootstrap)
        try:
            replicas = replication or min(self.size, 2)
            expected = partitions
            try:
                admin.create_topics([NewTopic(name, partitions, replicas, topic_configs=configs or {})])
            except TopicAlreadyExistsError:
                if not exist_ok:
                    raise
                expected = 1  # as it was made (auto-created: the broker's partition count)
            # Creation is asynchronous: the controller has accepted the topic, a broker's metadata
            # may not show it yet. A client that asks then may take it for missing (librdkafka
            # waits up to topic.metadata.propagation.max.ms, 30 s, before it decides), and a
            # test's first records would come late.
            deadline = time.monotonic() + 30
            while not _has_leaders(admin.describe_topics([name]), expected):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"topic {name}: no leader for every partition after 30 s")
                time.sleep(0.1)
        finally:
            admin.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop all nodes (SIGTERM: a clean shutdown; SIGKILL: a crash)."""
        for node in self.nodes:
            node.stop(sig)

    def destroy(self) -> None:
        """Stop all nodes and remove their data."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _has_leaders(described: list[dict], partitions: int) -> bool:
    """Tell whether a described topic has (at least) `partitions` partitions, each with a leader."""
    if not described or described[0].get("error_code", 0) != 0:
        return False
    parts = described[0].get("partitions") or []
    leaders = [p.get("leader_id", p.get("leader", -1)) for p in parts]
    return len(leaders) >= partitions and all(leader is not None and leader >= 0 for leader in leaders)
