"""Read Kafka sockets in large chunks instead of kafka-python's 4 KiB.

kafka-python 3.0 receives on its I/O thread with `sock.recv(4096)` in a loop until the socket
would block: about 250,000 calls per GB, each of which releases and re-acquires the GIL. While
the consumer's main thread is busy in Python (decompressing and parsing the previous fetch,
routing), every re-acquire waits for the interpreter's switch interval, so the I/O thread drains
the socket in 4 KiB steps and the main thread then waits for the fetch response (profiled: ~60 %
of the consumer's time). One `recv` of up to 1 MiB moves the same bytes with ~250 times fewer
GIL hand-offs. Nothing else changes: same loop, same end-of-data and error handling, and the
TLS transport (which has its own `_sock_recv`) is left alone.

The same hand-off also limits the big reads: a thread that released the GIL for `recv()` gets
it back only when the holder drops it, at the latest after the interpreter's switch interval
(5 ms). `favor_io_thread()` lowers that to 0.5 ms for the consumer process, so the I/O thread
keeps draining the socket while the main thread parses (measured on the 400 MB bench, same
run: ~160 -> ~250 MB/s median; kcat 330 MB/s).

Re-checked with kafka-python 3.0.12 (the newest release in December 2026, still `recv(4096)`):
`make bench` now runs the consumer with and without this module in every round (consumer part,
"without consumer/netfix.py" row). On a faster machine than the first measurement the gain is
smaller: 6 alternating pairs gave with/without ratios 0.98-1.20, median 1.07, 5 of 6 for it.
Small, consistent and free, so it stays; drop it when that row reaches 1.00.

A second fix, on both transports: kafka-python's read loop drops what it received when the same
recv loop then reads the end of the stream (`_read_from_sock` aborts on the error without passing
the bytes on). A broker that refuses a login sends its answer and closes right after it
(`connection.failed.authentication.delay.ms` delays both), so the consumer mostly saw only
"socket disconnected" and could not say the password was wrong (seen: 18 attempts in a row in a
CI run; 0, 6 and 6 in three local runs before the refusal was read). Here the bytes are delivered
first and the end of the stream is reported by the next read (the socket stays readable at EOF).

A third, on the copy of each response: kafka-python hands every record batch out of the
response buffer with `bytes(buffer[start:end])`, which copies the bytes twice (a bytearray
slice, then bytes of it), both with the GIL held. `_read_once` takes them through a
memoryview: one copy, the same bytes.

Applied once per process by the consumer (never by the agent). If a kafka-python version no
longer has the method it replaces, `apply()` does nothing and says so in the log.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

RECV_BYTES = 1 << 20
SWITCH_INTERVAL_S = 0.0005
_MARK = "_keplerlog_large_recv"
_EOF = "_keplerlog_eof"  # a transport's end of stream, reported by the read after the bytes
REPLACED: dict[str, Any] = {}  # kafka-python's own functions this module replaced (tests compare)


def _sock_recv(self: Any) -> tuple[bytes, BaseException | None]:
    """kafka-python's KafkaTCPTransport._sock_recv, with RECV_BYTES per call."""
    from kafka import errors

    received = []
    err: BaseException | None = None
    while True:
        try:
            data = self._sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            break
        except BaseException as exc:
            log.exception("%s: error receiving network data, closing socket", self)
            err = errors.KafkaConnectionError(exc)
            break
        if not data:  # a closed socket reads empty instead of raising
            log.error("%s: socket disconnected", self)
            err = errors.KafkaConnectionError("socket disconnected")
            break
        received.append(data)
    return (received[0] if len(received) == 1 else b"".join(received)), err


def _deliver_before_eof(original: Any) -> Any:
    """Wrap a transport's _sock_recv so bytes read before the end of the stream are delivered."""

    def _sock_recv_then_eof(self: Any) -> tuple[bytes, BaseException | None]:
        pending = self.__dict__.pop(_EOF, None)
        if pending is not None:
            return b"", pending
        data, err = original(self)
        if err is not None and data:
            self.__dict__[_EOF] = err
            return data, None
        return data, err

    setattr(_sock_recv_then_eof, _MARK, True)
    return _sock_recv_then_eof


def _read_once(self: Any, nbytes: int | None = None) -> bytes:
    """kafka-python's KafkaBytes.read (a bytearray with a read position), with one copy."""
    start = self._idx
    end = min(len(self), start + (len(self) - start if nbytes is None else nbytes))
    self._idx = end
    with memoryview(self) as view:
        return view[start:end].tobytes()


setattr(_read_once, _MARK, True)


def _copy_once() -> bool:
    """Install `_read_once` on kafka-python's response buffer, if it still has that shape."""
    try:
        from kafka.protocol.frame import KafkaBytes
    except ImportError:
        return False
    current = getattr(KafkaBytes, "read", None)
    if current is None:
        log.info("KafkaBytes.read not found: keeping kafka-python's response copies")
        return False
    if not getattr(current, _MARK, False):
        REPLACED["KafkaBytes.read"] = current
        KafkaBytes.read = _read_once
    return True


def apply() -> bool:
    """Install the one-copy response reads and the large-chunk receive (idempotent).

    The receive goes on kafka-python's plain TCP transport, the delivery of bytes before the end
    of the stream on both transports. Returns whether the receive is installed.
    """
    _copy_once()
    try:
        from kafka.net import transport
    except ImportError:
        log.info("kafka.net.transport not found: keeping kafka-python's socket reads")
        return False
    cls = getattr(transport, "KafkaTCPTransport", None)
    current = getattr(cls, "_sock_recv", None)
    if cls is None or current is None:
        log.info("KafkaTCPTransport._sock_recv not found: keeping kafka-python's socket reads")
        return False
    if getattr(current, _MARK, False):
        return True
    cls._sock_recv = _deliver_before_eof(_sock_recv)
    tls = getattr(transport, "KafkaSSLTransport", None)
    tls_recv = getattr(tls, "_sock_recv", None)
    if tls is not None and tls_recv is not None and not getattr(tls_recv, _MARK, False):
        tls._sock_recv = _deliver_before_eof(tls_recv)  # its own 4 KiB reads, the bytes kept
    return True


def applied() -> bool:
    """Tell whether the large-chunk receive is installed (tests, metrics)."""
    try:
        from kafka.net.transport import KafkaTCPTransport
    except ImportError:
        return False
    return bool(getattr(getattr(KafkaTCPTransport, "_sock_recv", None), _MARK, False))


def favor_io_thread(interval_s: float = SWITCH_INTERVAL_S) -> None:
    """Let threads waiting for the GIL (kafka-python's I/O thread) in sooner; never raises it."""
    if sys.getswitchinterval() > interval_s:
        sys.setswitchinterval(interval_s)
