"""
A worker's log events, carried to the parent as one short JSON line each.

The parent is the one process that writes the log (twistd's file, its
rotation, syslog, ``--log-format json``), so every worker event goes
through it.  A session logs at least its summary line, so what a line
costs matters: Twisted's own ``eventAsJSON``/``eventFromJSON`` carry the
whole flattened event and took most of the parent's CPU under load.  Here
the worker formats the event's text itself (with its traceback) and sends
only what the parent's observers read: the time, level, namespace, system,
that text, and (for ``--log-format json``) the event's scalar fields.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import InvalidLogLevelError, LogEvent, LogLevel, eventAsText

from popserv.server.logformat import json_scalar

#: The event key the relayed text is kept under (a ``log_`` key: the JSON
#: log format leaves those out of its fields, and shows it as ``text``).
TEXT_KEY = "log_relayed_text"
_FORMAT = "{" + TEXT_KEY + "}"


def record(event: LogEvent, fields: bool) -> str:
    """One event as a line of JSON (no newline); ``fields``: keep its scalar fields too."""
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    level = event.get("log_level")
    line: dict[str, Any] = {
        "t": event.get("log_time"),
        "l": getattr(level, "name", None),
        "n": event.get("log_namespace"),
        "s": event.get("log_system"),
        "x": text,
    }
    if fields:
        line["f"] = {
            key: value
            for key, value in event.items()
            if not key.startswith("log_") and json_scalar(value)
        }
    return json.dumps(line, separators=(",", ":"))


def event_of(line: str | bytes, worker: int | None) -> LogEvent:
    """
    The event a :func:`record` line stands for, in the parent; its system
    begins ``worker PID``, and it has ``worker`` (the pid) as a field.
    Raises ValueError if the line is not a record.
    """
    parsed = json.loads(line)
    if not isinstance(parsed, dict) or "x" not in parsed:
        raise ValueError("not a log record")
    event: LogEvent = dict(parsed.get("f") or {})
    mark = f"worker {worker}"
    system = parsed.get("s")
    try:
        level = LogLevel.levelWithName(parsed.get("l") or "info")
    except InvalidLogLevelError:
        level = LogLevel.info
    event.update({
        "log_time": parsed.get("t"),
        "log_level": level,
        "log_namespace": parsed.get("n") or "popserv",
        "log_system": f"{mark},{system}" if system and system != "-" else mark,
        "log_format": _FORMAT,
        TEXT_KEY: parsed["x"],
        "worker": worker,
    })
    return event


__all__ = ["event_of", "record"]
