"""
Per-user POP3 policy: LOGIN-DELAY and EXPIRE (RFC 2449 sections 6.5, 6.7).

The server-wide defaults come from twistd options; a user's entry in the
password file may override them with extra fields ``login_delay=SECONDS``
and ``expire=DAYS`` (or ``expire=never``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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


@implementer(IAccountSettings)
@frozen
class AccountSettings:
    """The LOGIN-DELAY and EXPIRE values in force for one user (or the server)."""

    login_delay: int = 0
    expire_days: int | None = None

    def override(self, extra: Mapping[str, str]) -> AccountSettings:
        """These settings with a password-file entry's extra fields applied."""
        settings = self
        if "login_delay" in extra:
            settings = evolve(settings, login_delay=parse_login_delay(extra["login_delay"]))
        if "expire" in extra:
            settings = evolve(settings, expire_days=parse_expire(extra["expire"]))
        return settings


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
            if user == default:
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
