"""
Per-user POP3 policy: LOGIN-DELAY and EXPIRE (RFC 2449 sections 6.5, 6.7),
and how many of the newest messages a session shows (``--max-listed``).

The server-wide defaults come from twistd options; a user's entry in the
password file may override them with extra fields ``login_delay=SECONDS``,
``expire=DAYS`` (or ``expire=never``) and ``max_listed=N`` (0: all).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from attrs import evolve, frozen
from zope.interface import implementer

from popserv.interfaces import IAccountSettings

NEVER = "NEVER"


def parse_expire(value: str) -> int | None:
    """``NEVER`` (any case) is None; otherwise a non-negative number of days."""
    if value.strip().upper() == NEVER:
        return None
    days = int(value)
    if days < 0:
        raise ValueError("expire must be NEVER or a number of days >= 0")
    return days


def parse_login_delay(value: str) -> int:
    seconds = int(value)
    if seconds < 0:
        raise ValueError("login delay must be >= 0 seconds")
    return seconds


def parse_max_listed(value: str) -> int:
    """How many of the newest messages a session shows: 0 (all) or more."""
    count = int(value)
    if count < 0:
        raise ValueError("must be a count >= 0 (0: all messages)")
    return count


@implementer(IAccountSettings)
@frozen
class AccountSettings:
    """The LOGIN-DELAY, EXPIRE and listing cap in force for one user (or the server)."""

    login_delay: int = 0
    expire_days: int | None = None
    #: Sessions show only the newest this many messages; 0: all of them.
    max_listed: int = 0

    def override(self, extra: Mapping[str, str]) -> AccountSettings:
        """These settings with a password-file entry's extra fields applied."""
        settings = self
        if "login_delay" in extra:
            settings = evolve(settings, login_delay=parse_login_delay(extra["login_delay"]))
        if "expire" in extra:
            settings = evolve(settings, expire_days=parse_expire(extra["expire"]))
        if "max_listed" in extra:
            settings = evolve(settings, max_listed=parse_max_listed(extra["max_listed"]))
        return settings


def session_settings(settings: Any, defaults: AccountSettings) -> AccountSettings | Any:
    """
    ``settings`` (an :class:`~popserv.interfaces.IAccountSettings` a
    mailbox gave) as a session reads them: one written before
    ``max_listed`` existed, or with a value that is not a count, gets the
    server's.
    """
    max_listed = getattr(settings, "max_listed", None)
    if isinstance(max_listed, int) and max_listed >= 0:
        return settings
    return AccountSettings(settings.login_delay, settings.expire_days, defaults.max_listed)


@frozen
class Announcement:
    """What CAPA says before login: the most restrictive values any user has."""

    login_delay: int
    expire_days: int | None
    per_user: bool

    @classmethod
    def of(cls, default: AccountSettings, users: Iterable[AccountSettings]) -> Announcement:
        delay, expire, differs = default.login_delay, default.expire_days, False
        for user in users:
            # Only what CAPA announces: a user's own max_listed is not said.
            if (user.login_delay, user.expire_days) == (default.login_delay, default.expire_days):
                continue
            differs = True
            delay = max(delay, user.login_delay)
            if user.expire_days is not None:
                expire = user.expire_days if expire is None else min(expire, user.expire_days)
        return cls(delay, expire, differs)


def capability_lines(
    settings: IAccountSettings | Announcement, *, per_user: bool = False
) -> list[str]:
    """The LOGIN-DELAY and EXPIRE CAPA lines, with ``USER`` when values differ per user."""
    suffix = " USER" if per_user else ""
    expire = NEVER if settings.expire_days is None else str(settings.expire_days)
    return [f"LOGIN-DELAY {settings.login_delay}{suffix}", f"EXPIRE {expire}{suffix}"]
