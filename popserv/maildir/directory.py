"""
Reaching a Maildir without following a symbolic link its user planted.

A user who can write inside a Maildir (``/home/{user}/Maildir``, the common
layout for local users) can replace ``cur/``, ``tmp/`` or the Maildir itself
with a symbolic link to a place only the server may read or change: the
password file's directory, another user's Maildir.  Checking each path
before using it leaves a window in which the link can be swapped in.

So a Maildir is opened as a directory descriptor, one path component at a
time with ``O_NOFOLLOW`` beneath the operator's own directory (the part of
the ``--maildir`` template before ``{user}``), and everything inside it is
reached relative to that descriptor (``os.open(..., dir_fd=...)``).  Inside
a Maildir nothing is ever followed; the Maildir's own path may be, where the
operator allows it (:attr:`MaildirPath.follow_symlinks`), for sites that
link Maildirs on purpose.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from attrs import frozen
from twisted.logger import Logger

log = Logger()

#: Open a directory, never through a symbolic link.
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: The Maildir's subdirectories.
SUBDIRS = ("cur", "new", "tmp")

#: Mode of the directories popserv creates: only the server (and the user,
#: when the server runs as the user) may look inside.
DIRECTORY_MODE = 0o700


class SymlinkRefused(OSError):
    """A component of a Maildir's path, or a directory inside it, is a symbolic link."""

    def __init__(self, path: Path) -> None:
        super().__init__(errno.ELOOP, "a symbolic link where a Maildir directory should be")
        self.path = path


@frozen
class MaildirPath:
    """
    Where one Maildir is: the operator's directory (``root``, whose path is
    followed as given) and the components beneath it (``parts``), which a
    user may control and which are not followed unless ``follow_symlinks``.
    """

    root: Path
    parts: tuple[str, ...]
    follow_symlinks: bool = False

    @classmethod
    def of(cls, where: MaildirPath | str | os.PathLike[str]) -> MaildirPath:
        """``where`` itself, or a plain path whose last component must not be a symlink."""
        if isinstance(where, MaildirPath):
            return where
        path = Path(where)
        return cls(path.parent, (path.name,))

    @property
    def path(self) -> Path:
        return self.root.joinpath(*self.parts)

    def __str__(self) -> str:
        return str(self.path)

    def open(self, *, create: bool = False) -> int:
        """
        A descriptor of the Maildir directory, which the caller closes.

        With ``create``, the Maildir and its ``cur/``, ``new/`` and ``tmp/``
        are made where missing (mode 0700), otherwise ``FileNotFoundError``.
        :class:`SymlinkRefused` (an ``OSError``, ``ELOOP``) names a symbolic
        link met where it is not allowed; it is also logged, with its path.
        Blocking, but quick: a few ``open`` calls.
        """
        if self.follow_symlinks:
            fd = _open_followed(self.path, create)
        else:
            fd = _open_followed(self.root, create)
            where = self.root
            for part in self.parts:
                where = where / part
                try:
                    fd = _replace(fd, open_subdirectory(fd, part, create=create, shown=where))
                except BaseException:
                    os.close(fd)
                    raise
        if create:
            try:
                for sub in SUBDIRS:
                    os.close(open_subdirectory(fd, sub, create=True, shown=self.path / sub))
            except BaseException:
                os.close(fd)
                raise
        return fd

    @contextlib.contextmanager
    def opened(self, *subdirs: str, create: bool = False) -> Iterator[tuple[int, ...]]:
        """
        The descriptors of the Maildir (:meth:`open`) and then of each of its
        ``subdirs`` (``"cur"``, ``"new"``, ``"tmp"``), all closed at the end
        of the ``with`` block.
        """
        fds = [self.open(create=create)]
        try:
            for sub in subdirs:
                fds.append(open_subdirectory(fds[0], sub, shown=self.path / sub))
            yield tuple(fds)
        finally:
            for fd in fds:
                os.close(fd)


def _replace(old: int, new: int) -> int:
    os.close(old)
    return new


def _open_followed(path: Path, create: bool) -> int:
    """The operator's part of the path: followed, created (with its parents) if asked."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            raise
    path.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_subdirectory(
    parent: int, name: str, *, create: bool = False, shown: Path | str | None = None
) -> int:
    """
    The directory ``name`` inside the directory ``parent``, never through a
    symbolic link (:class:`SymlinkRefused`, logged with ``shown``, the path
    to name in the log); made (mode 0700) if missing and ``create``.
    """
    try:
        return os.open(name, DIRECTORY_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
    except OSError as e:
        # O_NOFOLLOW|O_DIRECTORY on a symbolic link: ELOOP, or ENOTDIR on Linux.
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(parent, name):
            refused = SymlinkRefused(Path(shown if shown is not None else name))
            log.warn(
                "Refused a symbolic link where a Maildir directory should be: {path}",
                path=str(refused.path),
            )
            raise refused from None
        raise
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, DIRECTORY_MODE, dir_fd=parent)
    return open_subdirectory(parent, name, create=False, shown=shown)


def _is_symlink(parent: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False
