"""The configuration toolkit shared by the agent, consumer and prune."""

import pytest

from keplerlog.confkit import ConfigError, integer, number, overlay, read_yaml, section

VARS = {"KEPLERLOG_TOPIC": ("kafka", "topic"), "KEPLERLOG_ROOT": ("root",)}


def test_overlay_writes_nested_keys_and_leaves_the_input_alone():
    raw = {"kafka": {"bootstrap_servers": "k:9092"}}
    out = overlay(raw, {"KEPLERLOG_TOPIC": "t", "KEPLERLOG_ROOT": "/r", "OTHER": "x"}, VARS)
    assert out == {"kafka": {"bootstrap_servers": "k:9092", "topic": "t"}, "root": "/r"}
    assert raw == {"kafka": {"bootstrap_servers": "k:9092"}}  # a copy
    assert overlay(raw, {"KEPLERLOG_TOPIC": ""}, VARS) == raw  # empty values are ignored
    # a section that is not a mapping stays as it is, for section() to reject with its name
    bad = overlay({"kafka": [1]}, {"KEPLERLOG_TOPIC": "t"}, VARS)
    with pytest.raises(ConfigError, match="kafka: expected a mapping"):
        section(bad["kafka"], "kafka", {"topic"})


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: integer(True, "a.b", 0), "a.b: expected an integer"),
        (lambda: integer(1.5, "a.b", 0), "a.b: expected an integer, got 1.5"),
        (lambda: integer(70000, "metrics.port", 0, 65535), "between 0 and 65535"),
        (lambda: number("x", "lines.hold_s", 0), "lines.hold_s: expected a number"),
        (lambda: section({"x": 1}, "lines", {"hold_s"}), "lines: unknown key"),
    ],
)
def test_validators_name_the_key(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_read_yaml_says_where(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("kafka: [\n")
    with pytest.raises(ConfigError, match=r"invalid YAML in .*c\.yml at line 2"):
        read_yaml(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        read_yaml(tmp_path / "missing.yml")
