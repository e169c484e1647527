"""
Dovecot's passwd-file: one user a line, ``user:password:uid:gid:gecos:home:shell:extra``.

Everything after the password is optional.  ``extra`` holds space-separated
``key=value`` fields (``login_delay=900 expire=30``); a bare ``key`` is a
flag with an empty value.  Blank lines and ``#`` comments are allowed.

Names are stored as written and looked up normalised
(:func:`popserv.core.usernames.normalize_username` under the file's
:class:`~popserv.core.usernames.UsernameRules`): with case folded, ``Alice`` in
the file is found as ``alice`` or ``ALICE``, and still logs in to the Maildir
named ``Alice``.  Two lines whose names normalise alike are one user: the
first counts, as with a repeated name.

Reads are cached: :meth:`PasswdFile.lookup` costs one ``stat`` while the
file is unchanged.  Writes lock ``passwd.lock``, re-read the file, change
only the lines of the user concerned (comments, other users and lines this
module cannot parse stay byte for byte), and replace the file atomically.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType

from attrs import field, frozen
from twisted.logger import Logger

from popserv.core.errors import InvalidUsername
from popserv.core.files import replace_file
from popserv.core.usernames import DEFAULT_RULES, UsernameRules, validate_username
from popserv.logins.passwords.schemes import SCHEMES, extra_secrets, scheme_of

log = Logger()

#: uid, gid, gecos, home and shell: the fields between the password and the extras.
MIDDLE_FIELDS = 5

_FORBIDDEN_IN_FIELD = frozenset(":\n\r\x00")


class UserExists(KeyError):
    """The user is already in the password file."""

    def __str__(self) -> str:
        return f"user {self.args[0]!r} already exists"


class NoSuchUser(KeyError):
    """The user is not in the password file."""

    def __str__(self) -> str:
        return f"no user {self.args[0]!r}"


class InvalidField(ValueError):
    """A value that would break the ``:``-separated line format."""


class RefusedName(ValueError):
    """A line whose user name is refused; the reason is a fixed text, never the name."""


def _readonly(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@frozen
class UserEntry:
    """One user's line: name, stored password field, extra fields."""

    name: str
    password: str
    extra: Mapping[str, str] = field(factory=dict, converter=_readonly, hash=False)
    #: The uid, gid, gecos, home and shell fields as written (up to five), kept
    #: so that rewriting the line does not lose them.
    fields: tuple[str, ...] = field(default=(), converter=_strings)

    @property
    def scheme(self) -> str:
        """The password scheme, e.g. ``ARGON2ID`` (see :func:`scheme_of`)."""
        return scheme_of(self.password)

    @property
    def locked(self) -> bool:
        """
        Whether the account is locked: an empty password field, or one that
        starts with ``!`` or ``*`` (the crypt(3) convention).  A locked
        account logs in by no means, whatever secrets its extra fields hold.
        """
        return not self.password or self.password[0] in "!*"

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every stored form of the password: the field, then those in extra fields."""
        return (self.password, *extra_secrets(self.extra))

    @property
    def schemes(self) -> tuple[str, ...]:
        return tuple(scheme_of(secret) for secret in self.secrets)

    def to_line(self) -> str:
        """The passwd-file line for this entry, without the newline."""
        parts = [self.name, self.password, *self.fields]
        if self.extra:
            parts += [""] * (2 + MIDDLE_FIELDS - len(parts))
            parts.append(" ".join(f"{k}={v}" if v else k for k, v in self.extra.items()))
        return ":".join(parts)


def parse_line(text: str, *, mixed_scripts: bool = False) -> UserEntry:
    """
    Parse one user line (not a comment); :class:`ValueError` when malformed,
    the name included (see :func:`popserv.core.usernames.validate_username`).
    """
    parts = text.split(":", 2 + MIDDLE_FIELDS)
    if len(parts) < 2:
        raise ValueError("no password field")
    name, password = parts[0], parts[1]
    try:
        validate_username(name, mixed_scripts=mixed_scripts)
    except InvalidUsername as e:
        raise RefusedName(e.detail) from None
    extra: dict[str, str] = {}
    if len(parts) > 2 + MIDDLE_FIELDS:
        for item in parts[-1].split():
            key, _, value = item.partition("=")
            if not key:
                raise ValueError("extra field without a name")
            extra[key] = value
    middle = parts[2 : 2 + MIDDLE_FIELDS]
    # Empty trailing fields are padding for the extras: dropping them makes
    # an entry equal to the one it was written from.
    while middle and not middle[-1]:
        middle.pop()
    return UserEntry(name, password, extra, middle)


@frozen
class _Contents:
    """
    A parsed file: its raw lines, the entry (if any) of each and its lookup
    key (its name normalised), the live entries.
    """

    lines: tuple[bytes, ...]
    entries: tuple[UserEntry | None, ...]
    keys: tuple[str | None, ...]
    #: key -> index of the user's first line, the one that counts.
    first: Mapping[str, int]
    users: tuple[UserEntry, ...]

    def get(self, key: str) -> UserEntry | None:
        index = self.first.get(key)
        return None if index is None else self.entries[index]


def _parse(data: bytes, path: Path, rules: UsernameRules, *, warn: bool) -> _Contents:
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    entries: list[UserEntry | None] = []
    keys: list[str | None] = []
    first: dict[str, int] = {}
    for index, raw in enumerate(lines):
        entry = key = None
        try:
            text = raw.removesuffix(b"\r").decode("utf-8")
            if text.strip() and not text.lstrip().startswith("#"):
                entry = parse_line(text, mixed_scripts=rules.mixed_scripts)
                key = rules.key(entry.name)
        except (RefusedName, InvalidUsername) as e:
            entry = None
            if warn:
                log.warn(
                    "{path}: line {number}: {why}, skipped",
                    path=path,
                    number=index + 1,
                    why=e.args[0] if isinstance(e, RefusedName) else e.detail,
                )
        except ValueError:
            # Never the line itself: it may hold a password.
            if warn:
                log.warn("{path}: line {number} is malformed, skipped", path=path, number=index + 1)
        if entry is not None and key is not None:
            if key not in first:
                first[key] = index
            elif warn:
                earlier = first[key]
                log.warn(
                    "{path}: line {number} repeats the user on line {earlier}{how}, skipped",
                    path=path,
                    number=index + 1,
                    earlier=earlier + 1,
                    how=""
                    if entries[earlier].name == entry.name  # type: ignore[union-attr]
                    else " (names are matched without case: see --username-case)",
                )
        entries.append(entry)
        keys.append(key if entry is not None else None)
    users = tuple(entries[i] for i in first.values())
    return _Contents(tuple(lines), tuple(entries), tuple(keys), first, users)  # type: ignore[arg-type]


def _check_field(value: str, what: str) -> None:
    if any(char in _FORBIDDEN_IN_FIELD for char in value):
        raise InvalidField(f"{what} must not contain ':', a line break or NUL")


def _check_extra(key: str, value: str) -> None:
    _check_field(key, "an extra field name")
    _check_field(value, "an extra field value")
    if not key or "=" in key or any(char.isspace() for char in key + value):
        raise InvalidField("an extra field is a name without '=', and neither has spaces")


class PasswdFile:
    """
    A Dovecot passwd-file, read with a cache and rewritten atomically.

    Safe to use from several threads; writes from several processes are
    serialised by ``flock`` on ``PATH.lock``.  ``rules`` say how names are
    matched (see the module's docstring).
    """

    def __init__(self, path: str | os.PathLike[str], rules: UsernameRules = DEFAULT_RULES) -> None:
        self.path = Path(path)
        self.rules = rules
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock = threading.Lock()
        self._cache: tuple[tuple[int, int, int], _Contents] | None = None

    def __repr__(self) -> str:
        return f"PasswdFile({str(self.path)!r})"

    def exists(self) -> bool:
        """True when the file is there (it need not be readable)."""
        return self.path.exists()

    def lookup(self, name: str) -> UserEntry | None:
        """
        The entry of ``name`` (normalised first: ``ALICE`` finds ``Alice``
        when case is folded), or None, also for a name the rules refuse.
        The entry's :attr:`~UserEntry.name` is the name as stored, the one
        its Maildir is named after.

        Raises :class:`FileNotFoundError` (or another :class:`OSError`) when
        the file is missing or unreadable: that is a server fault, not an
        unknown user.
        """
        try:
            key = self.rules.normalize(name)
        except InvalidUsername:
            return None
        return self._current().get(key)

    def users(self) -> tuple[UserEntry, ...]:
        """
        Every user, in file order.

        The same tuple object is returned while the file is unchanged, so
        callers may cache what they derive from it.  Raises :class:`OSError`
        like :meth:`lookup`.
        """
        return self._current().users

    def add(
        self, name: str, password_field: str, extra: Mapping[str, str] | None = None
    ) -> UserEntry:
        """
        Append a user under its normalised name; :class:`UserExists` if that
        is taken.  Creates the file.
        """
        name = self.rules.normalize(name)
        entry = self._checked(UserEntry(name, password_field, extra or {}))

        def change(contents: _Contents) -> list[bytes]:
            if name in contents.first:
                raise UserExists(contents.get(name).name)  # type: ignore[union-attr]
            return [*contents.lines, entry.to_line().encode("utf-8")]

        self._rewrite(change, create=True)
        return entry

    def set_password(
        self, name: str, password_field: str, secrets: Mapping[str, str] | None = None
    ) -> UserEntry:
        """
        Replace the stored password of ``name`` (:class:`NoSuchUser` if absent):
        the field, and the extra fields holding other schemes (``secrets``,
        from :func:`hash_secrets`; the old ones go).
        """
        name = self.rules.normalize(name)
        _check_field(password_field, "the password field")

        def edit(entry: UserEntry) -> UserEntry:
            extra = {k: v for k, v in entry.extra.items() if k.upper() not in SCHEMES}
            extra.update(secrets or {})
            return UserEntry(entry.name, password_field, extra, entry.fields)

        return self._update(name, edit)

    def set_extra(self, name: str, key: str, value: str | None) -> UserEntry:
        """Set the extra field ``key`` of ``name``, or remove it when ``value`` is None."""
        name = self.rules.normalize(name)
        _check_extra(key, value or "")

        def edit(entry: UserEntry) -> UserEntry:
            extra = dict(entry.extra)
            if value is None:
                extra.pop(key, None)
            else:
                extra[key] = value
            return UserEntry(entry.name, entry.password, extra, entry.fields)

        return self._update(name, edit)

    def remove(self, name: str) -> None:
        """Delete every line of ``name`` (:class:`NoSuchUser` if absent)."""
        name = self.rules.normalize(name)

        def change(contents: _Contents) -> list[bytes]:
            if name not in contents.first:
                raise NoSuchUser(name)
            # Every line of the user: a repeated one would otherwise become live.
            return [
                raw for raw, key in zip(contents.lines, contents.keys, strict=True) if key != name
            ]

        self._rewrite(change)

    def _update(self, name: str, edit: Callable[[UserEntry], UserEntry]) -> UserEntry:
        updated: list[UserEntry] = []

        def change(contents: _Contents) -> list[bytes]:
            index = contents.first.get(name)
            if index is None:
                raise NoSuchUser(name)
            new = self._checked(edit(contents.entries[index]))  # type: ignore[arg-type]
            updated.append(new)
            lines = list(contents.lines)
            lines[index] = new.to_line().encode("utf-8")
            return lines

        self._rewrite(change)
        return updated[0]

    @staticmethod
    def _checked(entry: UserEntry) -> UserEntry:
        _check_field(entry.password, "the password field")
        for value in entry.fields:
            _check_field(value, "a passwd-file field")
        for key, value in entry.extra.items():
            _check_extra(key, value)
        return entry

    def _current(self) -> _Contents:
        with self._lock:
            st = os.stat(self.path)
            if self._cache is not None and self._cache[0] == _version(st):
                return self._cache[1]
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
            contents = _parse(data, self.path, self.rules, warn=True)
            self._cache = (_version(st), contents)
            return contents

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _rewrite(self, change: Callable[[_Contents], list[bytes]], *, create: bool = False) -> None:
        if create:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        elif not self.path.parent.is_dir():
            # No file, so no such user: ``change`` raises without creating anything.
            change(_parse(b"", self.path, self.rules, warn=False))
        with self._exclusive():
            try:
                with open(self.path, "rb") as f:
                    old: os.stat_result | None = os.fstat(f.fileno())
                    data = f.read()
            except FileNotFoundError:
                old, data = None, b""
            lines = change(_parse(data, self.path, self.rules, warn=False))
            # Durable, and with the owner and mode an administrator gave the
            # file (say root:popserv 0640), so the server can still read it.
            # Under the lock: the temporary file is PATH.tmp.
            data = b"".join(line + b"\n" for line in lines)
            replace_file(self.path, data, durable=True, like=old, locked=True)
        with self._lock:
            self._cache = None


def _version(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)
