import pytest

from keplerlog.record import (
    FORMAT_VERSION,
    MAX_LOST_RANGES,
    MAX_WATERMARK_BYTES,
    Batch,
    RecordFormatError,
    Watermark,
    decode_headers,
    decode_watermark,
    has_format_headers,
    is_watermark,
    merge_lost,
    split_legacy,
)


def _batch(**kw):
    base = dict(
        service="shop",
        module="portal",
        host="h1",
        path="/var/log/app.log",
        file_id="64769:12:abcd",
        offset=4096,
        lines=3,
        ts_ms=1_700_000_000_123,
    )
    base.update(kw)
    return Batch(**base)


def test_headers_round_trip():
    batch = _batch()
    assert decode_headers(batch.headers()) == batch
    assert batch.key() == b"shop/portal"
    assert has_format_headers(batch.headers())


def test_non_utf8_labels_round_trip():
    batch = _batch(path="/var/log/\udcff.log")
    assert decode_headers(batch.headers()).path == "/var/log/\udcff.log"


@pytest.mark.parametrize("drop", ["kl.v", "kl.service", "kl.module", "kl.file", "kl.offset", "kl.ts"])
def test_missing_header_is_a_format_error(drop):
    headers = [(k, v) for k, v in _batch().headers() if k != drop]
    with pytest.raises(RecordFormatError):
        decode_headers(headers)


def test_unknown_version_and_garbage_numbers_are_rejected():
    headers = dict(_batch().headers())
    with pytest.raises(RecordFormatError, match="version"):
        decode_headers(list({**headers, "kl.v": str(FORMAT_VERSION + 1).encode()}.items()))
    with pytest.raises(RecordFormatError, match=r"kl\.offset"):
        decode_headers(list({**headers, "kl.offset": b"\xff\x00"}.items()))
    with pytest.raises(RecordFormatError, match="negative"):
        decode_headers(list({**headers, "kl.lines": b"-1"}.items()))


def test_no_headers():
    assert not has_format_headers(None)
    with pytest.raises(RecordFormatError):
        decode_headers(None)


def test_split_legacy():
    assert split_legacy(b"portal##$$##2024-01-01 INFO hi\n") == (b"portal", b"2024-01-01 INFO hi\n")
    assert split_legacy(b"no prefix here\n") is None
    assert split_legacy(b"##$$##empty module\n") is None


def _mark(**kw) -> Watermark:
    fields = {
        "service": "shop",
        "module": "portal",
        "host": "web-1",
        "path": "/var/log/portal.log",
        "file_id": "abc123",
        "ts_ms": 1_700_000_000_000,
        "first": 0,
        "seen": 900,
        "acked": 700,
        "state": "gone",
        "lost": ((700, 900, "truncated"),),
    }
    return Watermark(**(fields | kw))


def test_watermark_round_trips_on_the_data_records_key():
    mark = _mark()
    assert is_watermark(mark.headers())
    assert decode_watermark(mark.headers(), mark.value()) == mark
    assert mark.key() == b"shop/portal"


def test_a_consumer_that_predates_watermarks_quarantines_them_instead_of_writing_them():
    # decode_headers is what such a consumer calls on every record with a kl.v header.
    with pytest.raises(RecordFormatError, match="not an integer"):
        decode_headers(_mark().headers())
    assert not is_watermark(_batch().headers())


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (b"", "empty"),
        (b"x" * (MAX_WATERMARK_BYTES + 1), "over"),
        (b"[1]", "not an object"),
        (b"{", "not JSON"),
        (b'{"first":0,"seen":1,"acked":-1}', "acked"),
        (b'{"first":5,"seen":9,"acked":4}', "below first"),
        (b'{"first":0,"seen":9,"acked":true}', "acked"),
        (b'{"first":0,"seen":9,"acked":4,"state":"sleeping"}', "state"),
        (b'{"first":0,"seen":9,"acked":4,"lost":[[5,4,"deleted"]]}', "lost"),
        (b'{"first":0,"seen":9,"acked":4,"lost":[[4,5,"stolen"]]}', "lost"),
        (b"[" * 2048 + b"]" * 2048, "not JSON"),  # nested past the interpreter's stack
        (b'{"first":0,"seen":9,"acked":1' + b"0" * 4000 + b"}", "acked"),  # no float can hold it
        (b'{"first":0,"seen":9,"acked":9223372036854775808}', "acked"),
        (b'{"first":0,"seen":9,"acked":4,"lost":[[4,9223372036854775808,"deleted"]]}', "lost"),
        (
            b'{"first":0,"seen":9,"acked":4,"lost":' + b'[[4,5,"deleted"]' + b',[6,7,"deleted"]' * 16 + b"]}",
            "lost",
        ),
    ],
)
def test_malformed_watermarks_are_format_errors(value, problem):
    with pytest.raises(RecordFormatError, match=problem):
        decode_watermark(_mark().headers(), value)


def test_watermark_headers_are_bounded_like_data_labels():
    headers = dict(_mark().headers())
    with pytest.raises(RecordFormatError, match=r"kl\.path"):
        decode_watermark(list({**headers, "kl.path": b"/" * 4097}.items()), _mark().value())
    with pytest.raises(RecordFormatError, match=r"kl\.file"):
        decode_watermark([(k, v) for k, v in headers.items() if k != "kl.file"], _mark().value())


def test_lost_ranges_are_sorted_and_capped_by_merging_the_lowest():
    many = [(i * 10, i * 10 + 5, "deleted") for i in range(MAX_LOST_RANGES + 3)][::-1]
    merged = merge_lost(many)
    assert len(merged) == MAX_LOST_RANGES
    assert merged[0] == (0, 35, "deleted")
    assert merged[1:] == tuple(sorted(many)[4:])
    assert merge_lost([(5, 5, "deleted")]) == ()
