"""
``twistd popserv --log-format json``: one JSON object per line, for Loki,
Elasticsearch and the like, in place of twistd's text lines.

twistd sets up logging itself, before the service runs: its ``--logger``
option names an observer factory, which it imports (``namedAny``) once the
subcommand's options are parsed and calls with no arguments.  So the
popserv options hand twistd the name of :func:`json_observer` and tell this
module where the log goes (:func:`use_json`): ``--logfile``, or standard
output as twistd would choose it.  ``--syslog`` is refused with it: syslog
lines are not where a JSON consumer reads.

Each object has ``time`` (ISO 8601, UTC), ``level``, ``namespace`` (the
module that logged), ``text`` (the line the text format shows, with a
traceback when there is one), then the event's own fields that are JSON
scalars, so a summary line's ``user``, ``peer`` or ``retr`` can be queried.
Twisted's ``log_*`` keys are left out, and so is anything that is not a
string, number, boolean or null (objects, bytes, failures).  Client text in
fields is escaped before it is logged (:func:`popserv.core.wire.loggable`);
JSON escapes control characters again, and ``ensure_ascii`` every other
non-ASCII one, so no raw CR, LF or terminal escape reaches the file.
"""

from __future__ import annotations

import json
import math
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, LogEvent, eventAsText
from twisted.python import logfile

TEXT = "text"
JSON = "json"
#: The values of ``--log-format``.
LOG_FORMATS = (TEXT, JSON)

#: The dotted name of the observer factory, for twistd's ``--logger``.
JSON_OBSERVER = f"{__name__}.json_observer"

#: The object's own keys, which an event's fields never replace.
_OWN = frozenset(("time", "level", "namespace", "text"))
#: Keys of events from the legacy ``twisted.python.log`` (their text is in
#: ``text``; ``time`` would clash).
_LEGACY = frozenset(("format", "isError", "message", "printed", "system", "time", "why"))


def parse_log_format(value: str) -> str:
    """A ``--log-format`` value: ``text`` or ``json``."""
    if value not in LOG_FORMATS:
        raise ValueError(f"must be {' or '.join(LOG_FORMATS)}, not {value!r}")
    return value


def json_scalar(value: object) -> bool:
    """Whether ``value`` is a JSON scalar the JSON log format shows as a field."""
    if isinstance(value, float):
        return math.isfinite(value)  # NaN and infinities are not JSON
    return value is None or isinstance(value, (str, int, bool))


def event_as_json(event: LogEvent) -> str:
    """One event as one line of JSON (no line end)."""
    when = datetime.fromtimestamp(event.get("log_time") or 0.0, UTC)
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "text": eventAsText(
            event, includeTraceback=True, includeTimestamp=False, includeSystem=False
        ),
    }
    for key, value in event.items():
        if (
            key.startswith(("log_", "_"))
            or key in _OWN
            or key in _LEGACY
            or not isinstance(key, str)
            or not json_scalar(value)
            or key == "summary"  # a summary line's text, already in "text"
        ):
            continue
        record[key] = value
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


def json_file_observer(out: IO[str]) -> ILogObserver:
    """An observer writing each event to ``out`` as one line of JSON."""
    return FileLogObserver(out, lambda event: event_as_json(event) + "\n")


#: Where :func:`json_observer` writes: set by :func:`use_json` from twistd's options.
_destination: dict[str, Any] = {}


def use_json(parent: Any) -> None:
    """
    Log JSON under twistd: ``parent`` is twistd's own options, whose
    ``logger`` is set to :data:`JSON_OBSERVER` (twistd imports it after the
    subcommand's options).  Raises ``ValueError`` for what cannot work.
    """
    if parent.get("syslog"):
        raise ValueError("--log-format json cannot go to syslog (--syslog): leave one out")
    if parent.get("logger"):
        raise ValueError("--log-format json replaces twistd's --logger: leave one out")
    _destination.update(logfile=parent.get("logfile"), nodaemon=bool(parent.get("nodaemon")))
    parent["logger"] = JSON_OBSERVER


def json_observer() -> ILogObserver:
    """
    twistd's ``--logger`` factory: JSON lines to where twistd would have
    written text (the rules of ``twisted.scripts._twistd_unix.UnixAppLogger``):
    ``--logfile -`` or ``--nodaemon`` without ``--logfile`` is standard
    output, otherwise ``--logfile`` (default ``twistd.log``), rotated by size
    and on SIGUSR1 as twistd's own.
    """
    name = _destination.get("logfile")
    nodaemon = _destination.get("nodaemon", True)
    if name == "-" and not nodaemon:
        sys.exit("Daemons cannot log to stdout, exiting!")
    if name == "-" or (nodaemon and not name):
        return json_file_observer(sys.stdout)
    out = logfile.LogFile.fromFullPath(name or "twistd.log")  # type: ignore[no-untyped-call]  # Twisted's, unannotated
    _rotate_on_sigusr1(out)
    return json_file_observer(out)


def _rotate_on_sigusr1(out: logfile.LogFile) -> None:
    import signal

    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: object) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(out.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)


__all__ = [
    "JSON",
    "JSON_OBSERVER",
    "LOG_FORMATS",
    "TEXT",
    "event_as_json",
    "json_file_observer",
    "json_observer",
    "parse_log_format",
    "use_json",
]
