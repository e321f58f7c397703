"""Which service/module names may become path components.

Names come from record headers or legacy line prefixes, i.e. from any container on any host:
they are untrusted. We reject rather than rewrite so that two different names can never map to
the same file; a rejected record goes to quarantine with the reason, nothing is lost.
"""

from __future__ import annotations

from keplerlog.layout import QUARANTINE_DIR
from keplerlog.record import MAX_NAME_BYTES

_FORBIDDEN = frozenset("/\\\x00")


def name_problem(name: str) -> str | None:
    r"""Say why `name` is not a safe path component, or None if it is.

    Rejected: empty, not UTF-8 (surrogate escapes), longer than 100 bytes, leading dot (covers
    `.` and `..` and hidden files), `/`, `\\`, NUL, any control character (C0, DEL, C1),
    leading/trailing whitespace, and the reserved name `_quarantine`.
    """
    if not name:
        return "empty name"
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not UTF-8"
    if len(raw) > MAX_NAME_BYTES:
        return f"name longer than {MAX_NAME_BYTES} bytes"
    if name[0] == ".":
        return "name starts with a dot"
    if name != name.strip():
        return "name has leading or trailing whitespace"
    if name == QUARANTINE_DIR:
        return "reserved name"
    for char in name:
        if char in _FORBIDDEN:
            return f"name contains {char!r}"
        code = ord(char)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return "name contains a control character"
    return None
