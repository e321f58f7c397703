#!/usr/bin/env python3
"""Demo service: writes Java-style (logback/log4j pattern) log lines at a steady rate.

Every event carries a unique sequence number `seq=N`. Now and then an ERROR event is followed by a
multi-line Java stack trace (continuation lines carry no seq). Rotation is done by the logging
framework itself (RotatingFileHandler: rename to .1, .2, ... then create a new file), as a Java
service's log framework would do it.

Configuration (environment):
  APP_NAME          module name, used in logger names and the log file name (default: portal)
  APP_HOME          /app/{APP_NAME}
  LOG_DIR           {APP_HOME}/logs
  LOG_RATE          events per second (default 20; 0 = idle)
  LOG_MAX_BYTES     rotate when the file reaches this size (default 10 MiB; 0 = never)
  LOG_BACKUPS       rotated files kept (default 10)
  LOG_TRACE_EVERY   one event in N is an ERROR with a stack trace (default 50; 0 = never)
  SEQ_FILE          where the next free seq is reserved (default {APP_HOME}/run/seq)

SIGTERM/SIGINT: finish the current event, log a last line, flush and exit 0.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import random
import signal
import sys
import time
from pathlib import Path

APP = os.environ.get("APP_NAME", "portal")
HOME = Path(os.environ.get("APP_HOME", f"/app/{APP}"))
LOG_DIR = Path(os.environ.get("LOG_DIR", str(HOME / "logs")))
RATE = float(os.environ.get("LOG_RATE", "20"))
MAX_BYTES = int(os.environ.get("LOG_MAX_BYTES", str(10 * 1024 * 1024)))
BACKUPS = int(os.environ.get("LOG_BACKUPS", "10"))
TRACE_EVERY = int(os.environ.get("LOG_TRACE_EVERY", "50"))
SEQ_FILE = Path(os.environ.get("SEQ_FILE", str(HOME / "run" / "seq")))
RESERVE = 1000  # seq numbers reserved ahead: a crash leaves a gap, never a duplicate

CLASSES = {
    "portal": ["Checkout", "CartController", "SessionFilter", "CatalogService", "PriceCache"],
    "billing": ["InvoiceService", "PaymentGateway", "LedgerWriter", "RefundJob", "TaxCalculator"],
}
MESSAGES = [
    ("INFO", "request handled path=/api/{kind}/{id} status=200 took={ms}ms"),
    ("INFO", "{kind} {id} updated by user u{user}"),
    ("DEBUG", "cache lookup key={kind}:{id} hit={hit}"),
    ("WARN", "slow downstream call {kind}-api took={ms}ms threshold=250ms"),
    ("INFO", "order {id} placed: {items} item(s), total={total} EUR"),
]
TRACE = """java.net.SocketTimeoutException: Read timed out
\tat java.base/sun.nio.ch.NioSocketImpl.timedRead(NioSocketImpl.java:288)
\tat java.base/java.net.Socket$SocketInputStream.read(Socket.java:1099)
\tat org.apache.http.impl.io.SessionInputBufferImpl.fillBuffer(SessionInputBufferImpl.java:153)
\tat com.kepler.{app}.client.DownstreamClient.call(DownstreamClient.java:{line})
\tat com.kepler.{app}.{cls}.handle({cls}.java:{line2})
\t... 42 common frames omitted
Caused by: java.io.IOException: connection reset by peer
\tat java.base/sun.nio.ch.SocketDispatcher.read0(Native Method)
\t... 7 more"""


def reserve_seq(start: int) -> int:
    """Persist `start + RESERVE` as the next free seq (atomic rename) and return it."""
    nxt = start + RESERVE
    tmp = SEQ_FILE.with_suffix(".tmp")
    tmp.write_text(f"{nxt}\n")
    os.replace(tmp, SEQ_FILE)
    return nxt


def setup_logging() -> logging.Handler:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    logging.addLevelName(logging.WARNING, "WARN")
    handler = logging.handlers.RotatingFileHandler(
        LOG_DIR / f"{APP}.log", maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8"
    )
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s [%(thread_name)s] %(name)s - %(message)s")
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    return handler


def main() -> int:
    SEQ_FILE.parent.mkdir(parents=True, exist_ok=True)
    try:
        seq = int(SEQ_FILE.read_text().strip() or "1")
    except (FileNotFoundError, ValueError):
        seq = 1
    limit = reserve_seq(seq)
    handler = setup_logging()
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    classes = CLASSES.get(APP, [c.title() for c in ("service", "controller", "repository")])
    loggers = [logging.getLogger(f"c.k.{APP}.{c}") for c in classes]
    main_log = logging.getLogger(f"c.k.{APP}.Application")
    rnd = random.Random()

    def emit(level: str, log: logging.Logger, msg: str, thread: str, trace: str = "") -> None:
        nonlocal seq, limit
        if seq >= limit:
            limit = reserve_seq(seq)
        lvl = logging.getLevelName("WARNING" if level == "WARN" else level)
        log.log(lvl, "%s seq=%d%s", msg, seq, f"\n{trace}" if trace else "", extra={"thread_name": thread})
        seq += 1

    emit("INFO", main_log, f"Started {APP} (pid {os.getpid()}, rate {RATE:g}/s)", "main")
    tick = 0.1
    budget = 0.0
    next_t = time.monotonic()
    while not stopping:
        budget += RATE * tick
        while budget >= 1 and not stopping:
            budget -= 1
            thread = f"http-nio-8080-exec-{rnd.randint(1, 10)}"
            log = rnd.choice(loggers)
            if TRACE_EVERY and rnd.randrange(TRACE_EVERY) == 0:
                cls = log.name.rsplit(".", 1)[-1]
                trace = TRACE.format(app=APP, cls=cls, line=rnd.randint(40, 400), line2=rnd.randint(40, 400))
                emit("ERROR", log, "request failed: downstream timeout", thread, trace)
                continue
            level, tmpl = rnd.choice(MESSAGES)
            msg = tmpl.format(
                kind=rnd.choice(["cart", "order", "item", "invoice"]),
                id=rnd.randint(10000, 99999),
                ms=rnd.randint(3, 900),
                user=rnd.randint(1, 5000),
                hit=rnd.random() < 0.8,
                items=rnd.randint(1, 9),
                total=f"{rnd.uniform(5, 500):.2f}",
            )
            emit(level, log, msg, thread)
        next_t += tick
        delay = next_t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_t = time.monotonic()  # fell behind: do not burst to catch up
    emit("INFO", main_log, "Stopping: SIGTERM received, shutting down", "main")
    handler.flush()
    logging.shutdown()
    # The next run continues from here, without a gap.
    tmp = SEQ_FILE.with_suffix(".tmp")
    tmp.write_text(f"{seq}\n")
    os.replace(tmp, SEQ_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
