"""
The QUIT commit, blocking: delete the messages the session deleted, mark
the ones it retrieved seen (moving them to ``cur/``), then make it durable.

Each file is reached through the Maildir's ``new/`` and ``cur/``
descriptors, and a message another program moved meanwhile is chased by
its unique name (:func:`~popserv.stores.maildir.places.chasing`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from attrs import define

from popserv.core.files import fsync_directory
from popserv.stores.maildir import maildirsize
from popserv.stores.maildir.directory import MaildirPath
from popserv.stores.maildir.names import parse_name, with_flag
from popserv.stores.maildir.places import CUR, SUBDIRS, Places, chasing


@define
class Outcome:
    """What a commit did, counted (never which files: those name users' mail)."""

    deleted: int = 0
    missing: int = 0
    failed: int = 0
    marked: int = 0
    unmarked: int = 0
    unsynced: int = 0
    #: Stored octets deleted, when the Maildir keeps a maildirsize.
    freed: int = 0


def apply(
    location: MaildirPath,
    deletions: Sequence[tuple[int, str]],
    marks: Sequence[tuple[int, str]],
) -> Outcome:
    """In a thread: delete and mark seen, then make it durable."""
    try:
        with location.opened(*SUBDIRS) as (top, *places):
            # Deletions free quota: counted where it is kept, if it is, and
            # under its lock, so that no rebuild lists them half done.
            if not (deletions and maildirsize.exists(top)):
                return _apply_in(places, deletions, marks)
            with maildirsize.lock_for(location):
                outcome = _apply_in(places, deletions, marks, counting=True)
                if outcome.deleted:
                    maildirsize.append(top, -outcome.freed, -outcome.deleted)
            return outcome
    except OSError:
        # The Maildir could not be reached (and is logged if refused).
        return Outcome(failed=len(deletions), unmarked=len(marks))


def _apply_in(
    places: Places,
    deletions: Sequence[tuple[int, str]],
    marks: Sequence[tuple[int, str]],
    counting: bool = False,
) -> Outcome:
    """:func:`apply` in the Maildir's ``new/`` and ``cur/``; ``counting``: sum the octets freed."""
    outcome = Outcome()
    touched: set[int] = set()
    deleted_in: set[int] = set()

    def unlink(where: int, name: str) -> None:
        if counting:
            size = parse_name(name).stored_size
            if size is None:
                size = os.stat(name, dir_fd=places[where], follow_symlinks=False).st_size
            os.unlink(name, dir_fd=places[where])
            outcome.freed += size
        else:
            os.unlink(name, dir_fd=places[where])
        touched.add(where)
        deleted_in.add(where)

    def mark_seen(where: int, name: str) -> None:
        target = with_flag(name, "S")
        if where == CUR and target == name:
            return
        os.rename(name, target, src_dir_fd=places[where], dst_dir_fd=places[CUR])
        touched.update((where, CUR))

    for where, name in deletions:
        try:
            chasing(places, where, name, unlink)
            outcome.deleted += 1
        except FileNotFoundError:
            outcome.missing += 1
        except OSError:
            outcome.failed += 1
    for where, name in marks:
        try:
            chasing(places, where, name, mark_seen)
            outcome.marked += 1
        except OSError:
            outcome.unmarked += 1
    for where in sorted(touched):
        try:
            fsync_directory(places[where])
        except OSError:
            if where in deleted_in:
                outcome.unsynced += 1
    return outcome
