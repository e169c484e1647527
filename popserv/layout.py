"""
Where popserv keeps things on disk: the data directory, the password file
and each user's Maildir.

Default layout under the data directory (``./popserv-data``)::

    passwd              Dovecot passwd-file: user:{SCHEME}secret:...
    mail/NAME/          one Maildir per user (cur/ new/ tmp/)

``--maildir`` takes a template with ``{user}`` so an existing tree
(``/home/{user}/Maildir``, a Dovecot ``mail_location``) can be served as is.
"""

from __future__ import annotations

import os
from pathlib import Path

from attrs import frozen

from popserv.usernames import validate_username

DEFAULT_DATA_DIR = "popserv-data"
MAILDIR_SUBDIRS = ("cur", "new", "tmp")


@frozen
class Layout:
    """Paths derived from the data directory and the two optional overrides."""

    data_dir: Path
    passwd_path: Path
    maildir_template: str

    @classmethod
    def create(
        cls,
        data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR,
        passwd: str | os.PathLike[str] | None = None,
        maildir_template: str | None = None,
    ) -> Layout:
        data = Path(data_dir).absolute()
        passwd_path = Path(passwd).absolute() if passwd else data / "passwd"
        template = maildir_template or str(data / "mail" / "{user}")
        if "{user}" not in template:
            raise ValueError("the maildir template must contain {user}")
        return cls(data, passwd_path, template)

    def maildir_for(self, user: str) -> Path:
        """The Maildir of ``user`` (a name already checked, checked again here)."""
        validate_username(user)
        return Path(self.maildir_template.replace("{user}", user))


def ensure_maildir(path: Path) -> Path:
    """Create ``path`` with ``cur/``, ``new/`` and ``tmp/`` (mode 0700) if missing."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for sub in MAILDIR_SUBDIRS:
        (path / sub).mkdir(mode=0o700, exist_ok=True)
    return path
