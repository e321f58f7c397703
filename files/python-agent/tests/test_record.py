import pytest

from keplerlog.record import (
    FORMAT_VERSION,
    Batch,
    RecordFormatError,
    decode_headers,
    has_format_headers,
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
