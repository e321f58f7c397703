"""The file layout template shared by the consumer (to write) and prune (to recognise files).

One template is the single source of truth: the consumer renders it, the retention job parses
it back into a regex, so retention can never touch a file the consumer would not have written.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

DEFAULT_LAYOUT = "{service}/{module}.{day}"
FIELDS = ("service", "module", "day")
QUARANTINE_DIR = "_quarantine"
STATE_DIR = ".keplerlog"
COMPRESSED_SUFFIXES = (".gz", ".zst")

# A name field (service/module) as the consumer may write it: see names.py for the full rule.
_NAME_RE = r"(?!\.)[^/\x00-\x1f\x7f]{1,100}"


class LayoutError(ValueError):
    """The layout template cannot be used safely."""


@dataclass(frozen=True)
class Layout:
    """A validated template such as `{service}/{module}.{day}` (day = YYYYMMDD)."""

    template: str

    def __post_init__(self) -> None:
        check_template(self.template)

    def render(self, service: str, module: str, day: str) -> str:
        """Relative path of a day file; the inputs must already be safe names (names.py)."""
        return self.template.format(service=service, module=module, day=day)

    def regex(self) -> re.Pattern[str]:
        """Regex matching relative paths the consumer may have written (plus .gz/.zst).

        Group `day` holds the YYYYMMDD date, group `ext` the compression suffix if any.
        """
        parts: list[str] = []
        seen_day = False
        for literal, field, _spec, _conv in string.Formatter().parse(self.template):
            parts.append(re.escape(literal))
            if field is None:
                continue
            if field == "day":
                parts.append(r"(?P<day>\d{8})" if not seen_day else r"(?P=day)")
                seen_day = True
            else:
                parts.append(_NAME_RE)
        suffixes = "|".join(re.escape(s) for s in COMPRESSED_SUFFIXES)
        return re.compile("".join(parts) + rf"(?P<ext>{suffixes})?")


def check_template(template: str) -> None:
    """Reject templates that could escape the root, collide with our own dirs or lack a day."""
    if not template or template.startswith("/") or "\\" in template or "\x00" in template:
        raise LayoutError(f"layout {template!r} must be a relative path template")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise LayoutError(f"layout {template!r}: {exc}") from exc
    for field in fields:
        if field not in FIELDS:
            raise LayoutError(f"layout {template!r}: unknown field {{{field}}} (use {', '.join(FIELDS)})")
    if "day" not in fields:
        raise LayoutError(f"layout {template!r} must contain {{day}}")
    for component in template.split("/"):
        if component in ("", ".", "..") or component.startswith("."):
            raise LayoutError(f"layout {template!r}: bad path component {component!r}")
    first = template.split("/")[0]
    if first.startswith(QUARANTINE_DIR) or first.startswith(STATE_DIR):
        raise LayoutError(f"layout {template!r} collides with {QUARANTINE_DIR}/ or {STATE_DIR}/")


def quarantine_path(day: str) -> str:
    """Relative path of the quarantine file of one day."""
    return f"{QUARANTINE_DIR}/{day}"
