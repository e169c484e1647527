"""
Per-user quotas: how much mail a Maildir may hold, and how much it holds.

The server-wide limits come from ``--quota-bytes`` and ``--quota-messages``;
a user's password-file entry may override them with the extra fields
``quota_bytes=SIZE`` and ``quota_messages=N`` (``0`` or ``none``: no limit),
or with Dovecot's ``quota_rule=*:storage=SIZE`` / ``*:messages=N`` (also
as ``userdb_quota_rule``, ``quota_rule2`` ...), so a Dovecot passwd-file
keeps its quotas.  Sizes take a ``k``, ``M``, ``G`` or ``T`` suffix
(powers of 1024).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from attrs import evolve, frozen

from popserv.stores.maildir import maildirsize
from popserv.stores.maildir.directory import MaildirPath
from popserv.stores.maildir.names import parse_name
from popserv.stores.maildir.places import SUBDIRS, list_messages

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"\s*(\d{1,20})\s*([bkmgt]?)b?\s*", re.IGNORECASE)
_RULE_KEY = re.compile(r"(userdb_)?quota_rule\d*")


def parse_size(text: str) -> int | None:
    """``10M`` is 10 MiB; ``0``, ``none`` and ``unlimited`` are no limit (None)."""
    if text.strip().lower() in ("none", "unlimited", "-"):
        return None
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (e.g. 500M, 2G)")
    size = int(match[1]) * _UNITS[match[2].lower()]
    return size or None


def parse_count(text: str) -> int | None:
    """A message count; ``0``, ``none`` and ``unlimited`` are no limit (None)."""
    if text.strip().lower() in ("none", "unlimited", "-"):
        return None
    count = int(text)
    if count < 0:
        raise ValueError("a message count must be >= 0")
    return count or None


@frozen
class Usage:
    """What a Maildir holds: stored octets and messages."""

    bytes: int
    messages: int


class OverQuota(Exception):
    """Storing the message would take the mailbox past its quota."""


@frozen
class Quota:
    """Limits on a mailbox; None is no limit."""

    bytes: int | None = None
    messages: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.bytes is None and self.messages is None

    def override(self, extra: Mapping[str, str]) -> Quota:
        """These limits with a password-file entry's quota fields applied (ValueError if bad)."""
        changes: dict[str, int | None] = {}
        for key, value in extra.items():
            if _RULE_KEY.fullmatch(key):
                changes.update(_dovecot_rule(value))
        if "quota_bytes" in extra:
            changes["bytes"] = parse_size(extra["quota_bytes"])
        if "quota_messages" in extra:
            changes["messages"] = parse_count(extra["quota_messages"])
        return evolve(self, **changes) if changes else self

    def full(self, usage: Usage) -> bool:
        """True when not even an empty message fits (RCPT can refuse at once)."""
        return (self.bytes is not None and usage.bytes >= self.bytes) or (
            self.messages is not None and usage.messages >= self.messages
        )

    def check(self, usage: Usage, incoming: int) -> None:
        """Raise :class:`OverQuota` unless a message of ``incoming`` octets fits."""
        if self.bytes is not None and usage.bytes + incoming > self.bytes:
            raise OverQuota(f"{usage.bytes} + {incoming} > {self.bytes} octets")
        if self.messages is not None and usage.messages + 1 > self.messages:
            raise OverQuota(f"{usage.messages} messages, limit {self.messages}")


def _dovecot_rule(value: str) -> dict[str, int | None]:
    """The limits in a Dovecot quota rule for all mailboxes (``*:storage=1G``)."""
    mailbox, _, settings = value.partition(":")
    if mailbox.strip() != "*":
        return {}  # rules for one folder do not apply to a POP3 maildrop
    changes: dict[str, int | None] = {}
    for setting in settings.split(":"):
        name, _, amount = setting.partition("=")
        name = name.strip().lower()
        if name in ("storage", "bytes"):
            # Dovecot reads a bare storage number as kilobytes.
            amount = amount.strip()
            changes["bytes"] = parse_size(amount + "k" if amount.isdigit() else amount)
        elif name == "messages":
            changes["messages"] = parse_count(amount)
    return changes


def maildir_usage(maildir: MaildirPath | Path) -> Usage:
    """
    Count the messages in ``new/`` and ``cur/`` and their stored size: the
    files a POP3 session would list (:func:`~popserv.stores.maildir.places.list_messages`).

    Sizes come from ``,S=`` in the names where present, else from ``stat``.
    A Maildir not made yet holds nothing.  Blocking: call it in a thread.
    """
    try:
        with MaildirPath.of(maildir).opened(*SUBDIRS) as (_, *places):
            return _count(places)
    except FileNotFoundError:
        return Usage(0, 0)


def current_usage(maildir: MaildirPath | Path, quota: Quota, now: float | None = None) -> Usage:
    """
    What the Maildir holds, for checking ``quota``: as its ``maildirsize``
    says (one small read), rebuilt from a listing when the file is missing,
    long, of another quota, or says "full" and is stale (see
    :mod:`popserv.stores.maildir.maildirsize`).  Blocking: call it in a thread.
    """
    line = maildirsize.quota_line(quota.bytes, quota.messages)
    now = time.time() if now is None else now
    location = MaildirPath.of(maildir)
    try:
        with location.opened() as (top,):
            stated = maildirsize.read_usage(top, line)
        if stated is not None:
            total, count, modified = stated
            usage = Usage(total, count)
            if not (quota.full(usage) and now - modified > maildirsize.STALE_SECONDS):
                return usage
        with maildirsize.lock_for(location), location.opened(*SUBDIRS) as (top, *places):
            usage = _count(places)
            maildirsize.write(top, line, usage.bytes, usage.messages)
            return usage
    except FileNotFoundError:
        return Usage(0, 0)


def _count(places: Sequence[int]) -> Usage:
    """:func:`maildir_usage` in the Maildir's ``new/`` and ``cur/``."""
    total = count = 0
    for place, names in zip(places, list_messages(places), strict=True):
        for name in names:
            size = parse_name(name).stored_size
            if size is None:
                try:
                    size = os.stat(name, dir_fd=place, follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
            total += size
            count += 1
    return Usage(total, count)
