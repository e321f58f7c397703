"""keplerlog.newlines.count must equal bytes.count on every shape of buffer it may be given."""

from __future__ import annotations

import random

import pytest

from keplerlog import newlines


def _buf(rng: random.Random, size: int, mean_line: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        out += b"x" * rng.randint(0, 2 * mean_line) + b"\n"
    return bytes(out[:size])


@pytest.mark.parametrize("mean_line", [0, 1, 50, 500, newlines.FIND_MIN_AVG, 2000, 20_000, 200_000])
def test_count_equals_bytes_count(mean_line: int) -> None:
    """Random slices of short-, long- and mixed-line buffers, both paths (probe then find/count)."""
    rng = random.Random(mean_line)
    for _ in range(200):
        buf = _buf(rng, rng.choice([0, 1, newlines.SMALL - 1, newlines.SMALL, 70_000, 600_000]), mean_line)
        start = rng.randint(0, len(buf))
        end = rng.randint(start, len(buf))
        assert newlines.count(buf, start, end) == buf.count(b"\n", start, end)
        assert newlines.count(buf) == buf.count(b"\n")


def test_count_boundaries() -> None:
    """Empty, no newline at all, newline first/last, long lines then short ones (the probe's
    decision must not skip what follows it), an end past the buffer as bytes.count allows."""
    long_then_short = (b"y" * 5000 + b"\n") * newlines.PROBE_LINES + b"z\n" * 10_000
    short_then_long = b"z\n" * newlines.PROBE_LINES + (b"y" * 5000 + b"\n") * 30
    cases = [
        b"",
        b"x" * 100_000,
        b"\n" + b"x" * 100_000,
        b"x" * 100_000 + b"\n",
        b"\n" * 100_000,
        long_then_short,
        short_then_long,
    ]
    for buf in cases:
        assert newlines.count(buf) == buf.count(b"\n")
        assert newlines.count(buf, 1, len(buf) + 10) == buf.count(b"\n", 1, len(buf) + 10)
    assert newlines.count(long_then_short) == newlines.PROBE_LINES + 10_000
