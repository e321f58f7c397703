"""The tools the peer benchmark compares: kcat, rsyslog (imfile + omkafka), Flume NG, kepler-log.

Each tool knows how to check that it is installed, how to write its own configuration for a
run and which command starts it. The measuring is done by bench_peers.py, identically for all.

Two ways of feeding a tool:
- "file": the tool is given the file and exits when it has delivered it (kcat);
- "tail": the tool watches a directory; once it has shipped a probe line (so start-up, JVM
  warm-up and Kafka metadata are behind it) the workload is hard-linked into that directory
  as a new file, which every tailer reads from its start. The clock starts at the link.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from string import Template

from peers.harness import REPO_ROOT, VENV_BIN, Tool, deployed_client

PEERS_DIR = Path(__file__).resolve().parent
FLUME_HOME = REPO_ROOT / "dist" / "peers" / "flume"
FLUME_VERSION = "1.11.0"
LINGER_MS = 5  # for the one-line-per-record tools; the agent keeps its own default


@dataclass
class RunSpec:
    """Where and what one tool run ships."""

    workdir: Path  # the tool's private state (config, positions, log)
    watch: Path  # the directory a tailer watches ("tail" tools)
    workload: Path  # the pre-written file ("file" tools read it directly)
    bootstrap: str
    topic: str
    cpu: int | None
    metrics_port: int = 0  # the kepler-log agent's, where the harness reads its acked lines


def _render(template: Path, target: Path, **values: str) -> Path:
    target.write_text(Template(template.read_text()).substitute(values))
    return target


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].strip() if text else ""


class Peer:
    """A tool under test. Subclasses fill in the details."""

    name = ""
    mode = "tail"
    lines_in_headers = False  # True when one record carries many lines (kepler-log)
    notes = ""
    # A reference is shown and compared with, but is not a peer: it never is the best peer.
    reference = False
    # kepler-log's own agent in another setting (its other Kafka client): compared with the best
    # peer like the agent, never a peer itself
    ours = False

    def missing(self) -> str:
        """Why the tool cannot run here ('' when it can)."""
        raise NotImplementedError

    def version(self) -> str:
        """The tool's version, for the results."""
        return ""

    def tool(self, spec: RunSpec) -> Tool:
        """Write the tool's configuration into spec.workdir and return it, ready to start."""
        raise NotImplementedError

    def counter(self, spec: RunSpec) -> Callable[[], int | None] | None:
        """How many workload lines Kafka holds, when the topic's end offsets do not say it
        (None from the callable: no reading this time)."""
        return None


class Kcat(Peer):
    """kcat (librdkafka) producing the file: the ceiling of a one-line-per-record producer."""

    name = "kcat"
    mode = "file"
    notes = f"kcat -P -l, lz4, acks=all, linger {LINGER_MS} ms; reads the file, no tailing"
    extra_args: tuple[str, ...] = ()

    def missing(self) -> str:
        return "" if shutil.which("kcat") else "kcat not installed (scripts/bench-deps.sh)"

    def version(self) -> str:
        try:
            out = subprocess.run(
                ["kcat", "-V"], check=False, capture_output=True, text=True, timeout=20
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return "kcat"
        words = out.split()
        # "... Version 1.7.1 (JSON, ..., librdkafka 2.0.2 builtin.features=...)"
        ver = words[words.index("Version") + 1] if "Version" in words else "?"
        rdk = words[words.index("librdkafka") + 1] if "librdkafka" in words else "?"
        return f"kcat {ver} (librdkafka {rdk})"

    def tool(self, spec: RunSpec) -> Tool:
        cmd = ["kcat", "-P", "-b", spec.bootstrap, "-t", spec.topic, "-z", "lz4"]
        cmd += [
            "-X",
            "acks=all",
            "-X",
            f"linger.ms={LINGER_MS}",
            *self.extra_args,
            "-l",
            str(spec.workload),
        ]
        return Tool(cmd, spec.workdir / "kcat.log", cpu=spec.cpu)


class KcatOneKey(Kcat):
    """kcat with every line under one key: one partition, as the agent sends one file's lines.

    The agent keys a record by `{service}/{module}` (the consumer's day file, its per-source
    dedup and audit), so one file's lines share one partition and, with kafka-python's
    idempotent producer, one batch in flight. kcat spreads keyless lines over every partition
    (librdkafka, up to 5 batches in flight each). This run tells how much of the gap to kcat is
    that spread rather than the agent's own cost.
    """

    name = "kcat-1key"
    reference = True
    notes = "kcat as above with one fixed key (-k): every line to one partition, as the agent's key; a reference, not a peer"

    extra_args = ("-k", "bench/peers")


class Rsyslog(Peer):
    """rsyslogd with imfile (inotify) and omkafka, in the foreground with its own config."""

    name = "rsyslog"
    notes = f"imfile (inotify) + omkafka, lz4, acks=-1, linger {LINGER_MS} ms"

    def _binary(self) -> str:
        return shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"

    def missing(self) -> str:
        if not Path(self._binary()).exists():
            return "rsyslog not installed (scripts/bench-deps.sh)"
        for mod in ("imfile.so", "omkafka.so"):
            if not list(Path("/usr/lib").glob(f"*/rsyslog/{mod}")):
                return f"rsyslog module {mod} missing (apt-get install rsyslog-kafka)"
        return ""

    def version(self) -> str:
        return _version([self._binary(), "-v"]).replace("compiled with:", "").strip()

    def tool(self, spec: RunSpec) -> Tool:
        brokers = ",".join(f'"{b}"' for b in spec.bootstrap.split(","))
        conf = _render(
            PEERS_DIR / "rsyslog" / "rsyslog.conf.in",
            spec.workdir / "rsyslog.conf",
            work=str(spec.workdir),
            watch=str(spec.watch),
            brokers=brokers,
            topic=spec.topic,
        )
        cmd = [
            self._binary(),
            "-n",
            "-f",
            str(conf),
            "-i",
            str(spec.workdir / "rsyslogd.pid"),
        ]
        return Tool(cmd, spec.workdir / "rsyslogd.log", cpu=spec.cpu)


class Flume(Peer):
    """Apache Flume NG: taildir source, memory channel, Kafka sink (the agent being replaced)."""

    name = "flume"
    notes = "taildir + memory channel + KafkaSink, batch 1000, lz4, acks=all, -Xmx512m"

    def missing(self) -> str:
        if not shutil.which("java"):
            return "java not installed"
        if not list((FLUME_HOME / "lib").glob("flume-ng-node-*.jar")):
            return "Flume jars missing in dist/peers/flume/lib (scripts/bench-deps.sh)"
        return ""

    def version(self) -> str:
        kafka = sorted((FLUME_HOME / "lib").glob("kafka-clients-*.jar"))
        client = kafka[-1].stem.removeprefix("kafka-clients-") if kafka else "?"
        return f"Flume NG {FLUME_VERSION} (kafka-clients {client})"

    def tool(self, spec: RunSpec) -> Tool:
        conf = _render(
            PEERS_DIR / "flume" / "flume.properties.in",
            spec.workdir / "flume.properties",
            work=str(spec.workdir),
            watch=str(spec.watch),
            bootstrap=spec.bootstrap,
            topic=spec.topic,
        )
        cmd = [
            "java",
            "-Xmx512m",
            f"-Dlog4j.configurationFile={PEERS_DIR / 'flume' / 'log4j2.xml'}",
            "-cp",
            str(FLUME_HOME / "lib" / "*"),
            "org.apache.flume.node.Application",
            "-n",
            "a1",
            "-f",
            str(conf),
            "--no-reload-conf",
        ]
        return Tool(cmd, spec.workdir / "flume.log", cpu=spec.cpu, cwd=spec.workdir)


def _entry(module: str, script: str) -> list[str] | None:
    """The command for a keplerlog entry point, or None while its module has not landed.

    The module is checked, not the console script: `pip install -e` writes the scripts of
    pyproject.toml before their modules exist.
    """
    try:
        found = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        found = None
    if found is None:
        return None
    exe = VENV_BIN / script
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


def agent_command() -> list[str] | None:
    """How to start the kepler-log agent here, or None while it has not landed."""
    return _entry("keplerlog.agent.main", "keplerlog-agent")


def consumer_command() -> list[str] | None:
    """How to start the kepler-log consumer here, or None while it has not landed."""
    return _entry("keplerlog.consumer.main", "keplerlog-consumer")


def agent_config(spec: RunSpec, client: str = "kafka-python") -> str:
    """The agent's YAML (schema in docs/interfaces.md) for one benchmark run.

    Only what the run needs (where to read, where to ship, the metrics port the harness counts
    acknowledged lines on): every tuning knob (linger_ms, max_record_bytes, limits) stays at the
    agent's default, as the peers keep theirs; `client` is the producer client (kafka.client).
    """
    return (
        "service: bench\n"
        "module: peers\n"
        "host: bench\n"
        "kafka:\n"
        f'  bootstrap_servers: "{spec.bootstrap}"\n'
        f"  topic: {spec.topic}\n"
        "  compression: lz4\n"
        f"  client: {client}\n"
        f"state_file: {spec.workdir / 'agent-state.json'}\n"
        "inputs:\n"
        f'  - paths: ["{spec.watch}/*.log"]\n'
        "metrics:\n"
        f"  port: {spec.metrics_port}\n"
        "  log_interval_s: 3600\n"
    )


AGENT = "keplerlog-agent"


def acked_lines(port: int) -> int | None:
    """The agent's `keplerlog_agent_lines_acked_total`; None when the page did not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as page:
            text = page.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("keplerlog_agent_lines_acked_total "):
            return int(float(line.split()[1]))
    return None


class KeplerlogAgent(Peer):
    """The kepler-log agent as the service image runs it, measured exactly like the peers."""

    name = AGENT
    lines_in_headers = True
    client = deployed_client()
    notes = (
        f"many lines per record (counted by kl.lines), lz4, agent defaults (linger 0 ms), "
        f"kafka.client: {client} (the service image's default)"
    )

    def missing(self) -> str:
        if self.client == "librdkafka" and importlib.util.find_spec("confluent_kafka") is None:
            return "confluent-kafka not installed (pip install 'keplerlog[librdkafka]')"
        if agent_command() is None:
            return "kepler-log agent not installed yet (no keplerlog-agent / keplerlog.agent.main)"
        return ""

    def version(self) -> str:
        try:
            from importlib.metadata import version

            return f"keplerlog {version('keplerlog')}"
        except Exception:
            return "keplerlog"

    def tool(self, spec: RunSpec) -> Tool:
        from keplerlog.testing.kafka_node import free_port

        spec.metrics_port = free_port()
        conf = spec.workdir / "agent.yml"
        conf.write_text(agent_config(spec, self.client))
        cmd = [*(agent_command() or []), "--config", str(conf)]
        return Tool(cmd, spec.workdir / "agent.log", cpu=spec.cpu)

    def counter(self, spec: RunSpec) -> Callable[[], int | None] | None:
        return lambda: acked_lines(spec.metrics_port)


class KeplerlogAgentOtherClient(KeplerlogAgent):
    """The agent with its other producer client (kafka.client): the same run, another client."""

    client = "kafka-python" if KeplerlogAgent.client == "librdkafka" else "librdkafka"
    name = f"keplerlog-agent-{client}"
    ours = True
    notes = f"the agent as above with kafka.client: {client}; the agent's option, not a peer"


ALL: dict[str, Peer] = {
    p.name: p
    for p in (KeplerlogAgent(), KeplerlogAgentOtherClient(), Kcat(), KcatOneKey(), Rsyslog(), Flume())
}
