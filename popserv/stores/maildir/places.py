"""
Where a Maildir's messages are: its ``new/`` and ``cur/``, listed, and
searched for a message another program moved.

Other programs (an IMAP server, a mail client on the same Maildir) may move
a message from ``new/`` to ``cur/`` or change its flags while a session is
open.  That renames the file but keeps its unique part, so each access that
finds the file gone looks it up again by that unique part
(:func:`chasing`) before deciding the message is really gone.

Both directories are reached through descriptors (see
:mod:`popserv.stores.maildir.directory`).  Blocking: call these in a thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

from popserv.stores.maildir.names import parse_name

T = TypeVar("T")

#: Indexes into :data:`SUBDIRS`; one byte per message says where it lives.
NEW, CUR = 0, 1
SUBDIRS = ("new", "cur")

#: The Maildir's ``new/`` and ``cur/`` as directory descriptors, by NEW and CUR.
Places = Sequence[int]

#: How often to chase a message that keeps moving before calling it gone.
_LOOKUP_TRIES = 3


def list_messages(places: Places) -> tuple[list[str], list[str]]:
    """
    The names of the message files in ``new/`` and ``cur/``: regular files
    (a symbolic link or a directory is no message), dot files left out.
    """
    listed = []
    # new/ before cur/: a message moving between them during the scan is then
    # seen at least once.
    for directory in places:
        with os.scandir(directory) as entries:
            listed.append(
                [
                    entry.name
                    for entry in entries
                    if entry.is_file(follow_symlinks=False) and not entry.name.startswith(".")
                ]
            )
    return listed[NEW], listed[CUR]


def _find(places: Places, unique: str) -> tuple[int, str] | None:
    """Where the message with this unique part is now, as (NEW or CUR, file name)."""
    for where, directory in enumerate(places):
        with os.scandir(directory) as entries:
            for entry in entries:
                name = entry.name
                if (
                    name.startswith(unique)
                    and parse_name(name).unique == unique
                    and entry.is_file(follow_symlinks=False)
                ):
                    return where, name
    return None


def chasing(
    places: Places, where: int, name: str, action: Callable[[int, str], T]
) -> tuple[int, str, T]:
    """
    Run ``action(where, name)``; if the file is gone, find where the message
    moved and run it there.  Return where it ran, the name there, and what
    ``action`` returned; raise ``FileNotFoundError`` if it is really gone.
    """
    unique = None
    for _ in range(_LOOKUP_TRIES):
        try:
            return where, name, action(where, name)
        except FileNotFoundError:
            if unique is None:
                unique = parse_name(name).unique
            found = _find(places, unique)
            if found is None:
                raise
            where, name = found
    return where, name, action(where, name)
