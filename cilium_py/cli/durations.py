"""Go duration syntax ("15s", "1h30m", "1.5s", "300ms"), as Cilium's flags take it: parsed
once here for every command (Hubble's time filters, the operator's intervals)."""

from __future__ import annotations

import re
from fractions import Fraction

import click

_UNITS_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9,
             "h": 3600 * 10**9}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
DURATION = re.compile(f"(?:{_PART.pattern})+")


def parse_go_duration(value: str) -> int:
    """Nanoseconds, >= 0 ("0" alone is allowed, as in Go). ValueError says what is wrong."""
    if value == "0":
        return 0
    pos, total = 0, Fraction(0)
    while pos < len(value):
        m = _PART.match(value, pos)
        if not m:
            break
        total += Fraction(m.group(1)) * _UNITS_NS[m.group(2)]
        pos = m.end()
    if not value or pos != len(value):
        raise ValueError("expected a duration like 10s, 5m, 1h30m")
    return int(total)


class GoDuration(click.ParamType):
    """A click option taking a Go duration; the value is in seconds (float)."""

    name = "duration"

    def __init__(self, allow_zero: bool = False):
        self.allow_zero = allow_zero

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            seconds = float(value)
        else:
            try:
                seconds = parse_go_duration(str(value).strip()) / 1e9
            except ValueError as e:
                self.fail(f"{value!r}: {e}", param, ctx)
        if seconds < 0 or (seconds == 0 and not self.allow_zero):
            self.fail(f"{value!r}: must be {'zero or ' if self.allow_zero else ''}positive", param, ctx)
        return seconds
