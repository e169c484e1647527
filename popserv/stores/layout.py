"""
Where popserv keeps things on disk: the data directory, the password file
and each user's Maildir.

Default layout under the data directory (``./popserv-data``)::

    passwd              Dovecot passwd-file: user:{SCHEME}secret:...
    mail/NAME/          one Maildir per user (cur/ new/ tmp/)

``--maildir`` takes a template with ``{user}`` so an existing tree
(``/home/{user}/Maildir``, a Dovecot ``mail_location``) can be served as is;
for names that are addresses, ``{local}`` and ``{domain}`` are the parts
before and after the last ``@`` (Dovecot's ``%n`` and ``%d``), so
Postfixadmin's ``/var/vmail/example.org/alice`` is
``/var/vmail/{domain}/{local}``.  The template's directories before the
first one named by a placeholder are the operator's; from that one on, a
user may control the path, so symbolic links there are refused unless
``--follow-maildir-symlinks`` allows them (see
:mod:`popserv.stores.maildir.directory`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from attrs import frozen

from popserv.core.errors import InvalidUsername
from popserv.core.usernames import validate_username
from popserv.stores.maildir.directory import MaildirPath

DEFAULT_DATA_DIR = "popserv-data"


@frozen
class Layout:
    """Paths derived from the data directory and the two optional overrides."""

    data_dir: Path
    passwd_path: Path
    maildir_template: str
    #: Follow symbolic links in the user's part of the Maildir's path
    #: (never inside a Maildir): for sites that link Maildirs on purpose.
    follow_symlinks: bool = False

    @classmethod
    def create(
        cls,
        data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR,
        passwd: str | os.PathLike[str] | None = None,
        maildir_template: str | None = None,
        *,
        follow_symlinks: bool = False,
    ) -> Layout:
        data = Path(data_dir).absolute()
        passwd_path = Path(passwd).absolute() if passwd else data / "passwd"
        template = maildir_template or str(data / "mail" / "{user}")
        if not any(f"{{{name}}}" in template for name in ("user", "local", "maildir")):
            raise ValueError("the maildir template must contain {user} (or {local})")
        if "{maildir}" in template and not re.search(r"(^|/)\{maildir\}(/|$)", template):
            raise ValueError("{maildir} must be whole directories of the maildir template")
        if "{local}" in template and "{domain}" not in template:
            # Else alice@a.example and alice@b.example would share a Maildir.
            raise ValueError("a maildir template with {local} must contain {domain} too")
        return cls(data, passwd_path, template, follow_symlinks)

    def maildir_for(self, user: str, maildir: str | None = None) -> Path:
        """The Maildir of ``user`` (a name already checked, checked again here)."""
        return self.maildir_location(user, maildir).path

    def maildir_location(self, user: str, maildir: str | None = None) -> MaildirPath:
        """
        The Maildir of ``user`` as popserv opens it: the template's
        directories before the one ``{user}`` is in are followed as given,
        the rest without symbolic links unless :attr:`follow_symlinks`.
        ``maildir`` is the account's own relative path for ``{maildir}``
        (Postfixadmin's ``maildir`` column); without one, the path
        Postfixadmin gives a new account, ``domain/local/``.
        """
        # Only what makes a safe path: which names are users is the password
        # file's business (its rules may allow mixed scripts).
        validate_username(user, mixed_scripts=True)
        parts = Path(self.maildir_template).parts
        first = next(i for i, part in enumerate(parts) if _PLACEHOLDER.search(part))
        values = {"user": user}
        local, at, domain = user.rpartition("@")
        if at and local and domain:
            values.update(local=local, domain=domain)
        else:
            values.update(local=user, domain="")
        filled: list[str] = []
        for part in parts[first:]:
            if part == "{maildir}":
                filled += _relative(maildir, values)
            else:
                filled.append(_filled(part, values))
        return MaildirPath(
            Path(*parts[:first]) if first else Path(),
            tuple(filled),
            self.follow_symlinks,
        )


_PLACEHOLDER = re.compile(r"\{(user|local|domain|maildir)\}")


def _relative(maildir: str | None, values: dict[str, str]) -> list[str]:
    """
    The directories of an account's own path (``example.org/alice/``), or of
    Postfixadmin's default for it; one that would climb out, be absolute,
    hidden or empty is refused.
    """
    if maildir is None:
        if not values["domain"]:
            raise InvalidUsername("no maildir for a name without a domain")
        maildir = f"{values['domain']}/{values['local']}/"
    parts = maildir.strip("/").split("/")
    if maildir.startswith("/") or not all(
        part and part not in (".", "..") and part[0] != "." and "\0" not in part
        for part in parts
    ):
        raise InvalidUsername(f"the account's maildir {maildir!r} is not a relative path")
    return parts


def _filled(part: str, values: dict[str, str]) -> str:
    """
    A template's path component with its placeholders replaced.  One the
    name made empty, ``.``, ``..`` or hidden is refused; the operator's own
    components (``.maildir``) are kept as written.
    """
    if not _PLACEHOLDER.search(part):
        return part
    filled = _PLACEHOLDER.sub(lambda m: values[m.group(1)], part)
    if not filled or filled in (".", "..") or filled[0] == ".":
        # {domain} of a name with no domain, or a part only the placeholders made.
        raise InvalidUsername(f"no path for this name in the maildir template ({part})")
    return filled


def ensure_maildir(path: MaildirPath | Path) -> Path:
    """
    Create the Maildir at ``path`` with ``cur/``, ``new/`` and ``tmp/``
    (mode 0700) where missing, without following a symbolic link into it.
    """
    location = MaildirPath.of(path)
    os.close(location.open(create=True))
    return location.path


#: A user id and group id to give files to.
Owner = tuple[int, int]


def missing(path: Path) -> list[Path]:
    """``path`` and each of its ancestors that do not exist yet, outermost first."""
    absent: list[Path] = []
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            break
        absent.append(candidate)
    return absent[::-1]


def give_to(owner: Owner, paths: Iterable[Path]) -> None:
    """
    Hand ``paths`` (and, for directories, all they hold) to ``owner``, so a
    server that drops root privileges (``twistd --uid``) can use what root
    created for it.  Symbolic links are changed, never followed.
    """
    uid, gid = owner
    for path in paths:
        if not os.path.lexists(path):
            continue
        os.lchown(path, uid, gid)
        if path.is_dir() and not path.is_symlink():
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    os.lchown(os.path.join(root, name), uid, gid)
