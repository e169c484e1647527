"""
Opening a maildrop for a login, blocking: the Maildir created if missing,
locked, then listed from the listing cache when it is current, or scanned;
and, once the login is answered, the caches the scan left written.

The listing cache and the index are files of their own modules
(:mod:`popserv.stores.maildir.listcache`, :mod:`popserv.stores.maildir.index`); here is
when they are read and written.  :func:`open_locked` and :func:`save_caches`
run in the reactor's thread pool; :func:`open_cached` is quick enough for
the reactor thread, and answers None whenever it is not.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from attrs import evolve

from popserv.core.errors import storage_failure
from popserv.stores.maildir.directory import MaildirPath, SymlinkRefused
from popserv.stores.maildir.index import save_index
from popserv.stores.maildir.listcache import (
    Cached,
    encode_listing,
    load_listing,
    save_listing,
    settled,
    stat_key,
)
from popserv.stores.maildir.lock import HeldLock, lock_maildrop
from popserv.stores.maildir.locktable import LockTable
from popserv.stores.maildir.places import CUR, NEW, SUBDIRS, Places
from popserv.stores.maildir.scan import Scan, scan
from popserv.stores.maildir.uidlist import UIDLIST_FILE
from popserv.stores.maildir.uidls import UidlScheme


def _listing_keys(maildir: int, places: Places, scheme: UidlScheme) -> list[Any]:
    """The listing cache's key (see :mod:`popserv.stores.maildir.listcache`)."""
    keys: list[Any] = [stat_key(os.fstat(places[NEW])), stat_key(os.fstat(places[CUR]))]
    uidlist = None
    if scheme.reads_uidlist:
        with contextlib.suppress(FileNotFoundError):
            uidlist = stat_key(os.stat(UIDLIST_FILE, dir_fd=maildir, follow_symlinks=False))
    keys.append(uidlist)
    return keys


def open_locked(
    location: MaildirPath,
    scheme: UidlScheme,
    use_index: bool,
    shared: bool = False,
    table: LockTable | None = None,
) -> tuple[HeldLock, Scan]:
    """In a thread: create the Maildir if needed, lock it (``shared`` or not), index it."""
    started = time.time_ns()
    with contextlib.ExitStack() as stack:
        try:
            # Only a new user's first login creates anything: no mkdir at every login.
            opened = location.opened(*SUBDIRS, create=True)
            maildir, *places = stack.enter_context(opened)
        except OSError as e:
            raise storage_failure("cannot open the maildir", e) from None
        lock = lock_maildrop(maildir, shared=shared, table=table)
        try:
            # Under the lock: a session that committed (deleted) meanwhile
            # changed the directories, and its listing must not be taken.
            # (A shared lock lets one commit now: the keys are read first, so
            # the listing is at worst that of the moment they were read.)
            keys = _listing_keys(maildir, places, scheme) if use_index else None
            cached = load_listing(maildir, keys, scheme.text) if keys else None
            if cached is not None:
                return lock, _cached_scan(cached)
            scanned = scan(maildir, places, scheme, use_index)
            if use_index and keys and settled(keys, started):
                # Written by the mailbox after the login is answered (see
                # save_caches): encoding and writing 100,000 entries (8 MB)
                # took 20-30 ms of a cold login.
                scanned = evolve(scanned, cache_as=(keys, scheme.text))
            return lock, scanned
        except OSError as e:
            lock.release()
            raise storage_failure("cannot scan the maildir", e) from None
        except BaseException:
            lock.release()
            raise


def _cached_scan(cached: Cached) -> Scan:
    """A scan's result as the listing cache kept it."""
    return Scan(
        cached.listing,
        cached.uniques,
        cached.infos,
        cached.places,
        counted=0,
        indexed=0,
        uidlist_listed=cached.uidlist_listed,
        uidlist_skipped=0,
        index_update=None,
    )


#: A maildrop whose ``new/`` and ``cur/`` directories are at most this large
#: (their ``st_size``: on ext4 a 4 KiB block holds about 50 Maildir names)
#: is opened in the reactor thread when its listing cache is current.
INLINE_DIRECTORY_BYTES = 16 * 1024


def open_cached(
    location: MaildirPath,
    scheme: UidlScheme,
    shared: bool = False,
    table: LockTable | None = None,
) -> tuple[HeldLock, Scan] | None:
    """
    Lock a small maildrop and take its listing from the cache, or None when
    it is not that simple (then :func:`open_locked` runs in a thread).

    A few ``open`` and ``fstat`` calls, a non-blocking ``flock`` and one
    small read: the thread-pool round trip they replace cost a quarter of a
    short session (bench B1: 720 -> 960 sessions/s).  Anything that could
    take long (a big directory, a scan, reading messages) stays in the
    thread pool.
    """
    with contextlib.ExitStack() as stack:
        try:
            maildir, *places = stack.enter_context(location.opened(*SUBDIRS))
        except SymlinkRefused as e:
            raise storage_failure("cannot open the maildir", e) from None
        except OSError:
            return None  # The thread pool's open reports it properly.
        try:
            if any(os.fstat(fd).st_size > INLINE_DIRECTORY_BYTES for fd in places):
                return None
        except OSError:
            return None
        lock = lock_maildrop(maildir, shared=shared, table=table)
        try:
            # Under the lock, as in open_locked.
            keys = _listing_keys(maildir, places, scheme)
            cached = load_listing(maildir, keys, scheme.text)
        except OSError:
            cached = None  # The thread pool's open reports it properly.
        except BaseException:
            lock.release()
            raise
        if cached is None:
            lock.release()
            return None
        return lock, _cached_scan(cached)


def save_caches(location: MaildirPath, scan: Scan) -> bool:
    """
    In a thread, after the login was answered: write the index (if it
    changed) and the listing cache (if the scan is to be kept; ``scan``
    must then be a copy the session does not change meanwhile).  The result
    is :func:`~popserv.stores.maildir.index.save_index`'s, or False if not called.

    Neither needs the maildrop lock: each file is replaced atomically, and a
    listing is only ever read under the key of the directories it was made
    from, which a later change (this session's commit included) moves on.
    """
    with location.opened() as (maildir,):
        try:
            if scan.index_update is None:
                return False
            return save_index(maildir, scan.index_update)
        finally:
            # Also when the index could not be written (save_listing never raises).
            if scan.cache_as is not None:
                keys, scheme = scan.cache_as
                data = encode_listing(
                    keys,
                    scheme,
                    listing=scan.listing,
                    uniques=scan.uniques,
                    infos=scan.infos,
                    places=scan.places,
                    uidlist_listed=scan.uidlist_listed,
                )
                save_listing(maildir, data)
