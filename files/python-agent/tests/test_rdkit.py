"""rdkit.Problems: the reason a librdkafka client gives, and warnings that do not flood the log."""

from __future__ import annotations

import logging

from keplerlog.rdkit import PROBLEM_LOG_EVERY_S, Problems

REFUSED = (
    "127.0.0.1:{port}/{n}: Connect to ipv4#127.0.0.1:{port} failed: Connection refused"
    " (after 0ms in state CONNECT, {n} identical error(s) suppressed)"
)
LOGIN = (
    "sasl_ssl://kafka-1:9093/1: SASL authentication error: Authentication failed during"
    " authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512"
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_an_outage_past_the_interval_warns_once_per_interval_not_per_retry(caplog):
    clock = Clock()
    problems = Problems(logging.getLogger("test.rdkit"), "Kafka", clock=clock)
    caplog.set_level(logging.WARNING, "test.rdkit")
    # librdkafka's error_cb over 150 s of an outage: 3 brokers, a new text every second each
    for second in range(150):
        clock.now = 1000.0 + second
        for port in (9092, 9093, 9094):
            problems.note(REFUSED.format(port=port, n=second))
    warnings = _warnings(caplog)
    assert PROBLEM_LOG_EVERY_S * 2 < 150  # past the interval twice: three warnings, not 450
    assert len(warnings) == 3, warnings
    assert warnings[0].startswith("Kafka: not reachable [") and "more since" not in warnings[0]
    # each later one counts what it stood for: 60 s of 3 brokers, less the one logged
    assert warnings[1].endswith(f"({int(PROBLEM_LOG_EVERY_S) * 3 - 1} more since the last such warning)")
    assert problems.reason == REFUSED.format(port=9094, n=149)


def test_a_refused_login_is_warned_at_once_and_stays_the_reason(caplog):
    clock = Clock()
    problems = Problems(logging.getLogger("test.rdkit"), "Kafka", clock=clock)
    caplog.set_level(logging.WARNING, "test.rdkit")
    problems.note(REFUSED.format(port=9092, n=0))
    problems.note(LOGIN)  # another kind: not held back by the disconnect's interval
    for n in range(1, 20):
        problems.note(REFUSED.format(port=9092, n=n))  # the disconnects after a refused login
    warnings = _warnings(caplog)
    assert len(warnings) == 2, warnings
    assert warnings[1].startswith("Kafka: login refused: wrong user name or password")
    assert problems.reason == LOGIN  # says more than "not reachable"
    problems.note(LOGIN.replace("SCRAM-SHA-512", "SCRAM-SHA-256"))
    assert len(_warnings(caplog)) == 2  # the same kind within the interval


def test_without_a_logger_only_the_reason_is_kept(caplog):
    problems = Problems(None, "Kafka producer")
    caplog.set_level(logging.DEBUG)
    problems.note(LOGIN)
    problems.note(REFUSED.format(port=9092, n=1))
    assert problems.reason == LOGIN
    assert caplog.records == []
