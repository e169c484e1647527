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

from attrs import field, frozen
from twisted.logger import Logger

log = Logger()

#: Open a directory, never through a symbolic link.
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Open a directory whose path the operator lets popserv follow.
_FOLLOWING = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

#: The Maildir's subdirectories.
MAILDIR_SUBDIRS = ("cur", "new", "tmp")

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
    #: What the first ``open`` opens, as a string: the path to the first of
    #: the user's components (O_NOFOLLOW guards the last component only), or
    #: the whole path when it may be followed.  Every RETR opens it.
    _first: str = field(init=False, eq=False, repr=False)
    _rest: tuple[str, ...] = field(init=False, eq=False, repr=False)

    @_first.default
    def _first_default(self) -> str:
        if self.follow_symlinks or not self.parts:
            return str(self.path)
        return str(self.root / self.parts[0])

    @_rest.default
    def _rest_default(self) -> tuple[str, ...]:
        return () if self.follow_symlinks else self.parts[1:]

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
        flags = _FOLLOWING if self.follow_symlinks or not self.parts else DIRECTORY_FLAGS
        try:
            fd = os.open(self._first, flags)
        except OSError:
            # Missing, or a link: the careful way, which creates and explains.
            fd = self._open_first(create)
        for depth, part in enumerate(self._rest, start=1):
            try:
                within = self.root.joinpath(*self.parts[:depth])
                fd = _replace(fd, open_subdirectory(fd, part, create=create, within=within))
            except BaseException:
                os.close(fd)
                raise
        if create:
            try:
                for sub in MAILDIR_SUBDIRS:
                    os.close(open_subdirectory(fd, sub, create=True, within=self))
            except BaseException:
                os.close(fd)
                raise
        return fd

    def _open_first(self, create: bool) -> int:
        if self.follow_symlinks or not self.parts:
            return _open_followed(self.path, create)
        root = _open_followed(self.root, create)
        try:
            return open_subdirectory(root, self.parts[0], create=create, within=self.root)
        finally:
            os.close(root)

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
                fds.append(open_subdirectory(fds[0], sub, within=self))
            yield tuple(fds)
        finally:
            for fd in fds:
                os.close(fd)

    def open_file(self, subdir: str, name: str, flags: int) -> int:
        """
        Open ``name`` in the Maildir's ``subdir`` with ``flags`` (add
        ``O_NOFOLLOW``): :meth:`opened` without its generator, for RETR.
        """
        top = self.open()
        try:
            directory = open_subdirectory(top, subdir, within=self)
        finally:
            os.close(top)
        try:
            return os.open(name, flags, dir_fd=directory)
        finally:
            os.close(directory)


def _replace(old: int, new: int) -> int:
    os.close(old)
    return new


def _open_followed(path: Path, create: bool) -> int:
    """The operator's part of the path: followed, created (with its parents) if asked."""
    try:
        return os.open(path, _FOLLOWING)
    except FileNotFoundError:
        if not create:
            raise
    path.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    return os.open(path, _FOLLOWING)


def open_subdirectory(
    parent: int, name: str, *, create: bool = False, within: object = None
) -> int:
    """
    The directory ``name`` inside the directory ``parent``, never through a
    symbolic link (:class:`SymlinkRefused`, logged with the path ``within``
    names, the parent's); made (mode 0700) if missing and ``create``.
    """
    try:
        return os.open(name, DIRECTORY_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
    except OSError as e:
        # O_NOFOLLOW|O_DIRECTORY on a symbolic link: ELOOP, or ENOTDIR on Linux.
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(parent, name):
            refused = SymlinkRefused(Path(str(within)) / name if within is not None else Path(name))
            log.warn(
                "Refused a symbolic link where a Maildir directory should be: {path}",
                path=str(refused.path),
            )
            raise refused from None
        raise
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, DIRECTORY_MODE, dir_fd=parent)
    return open_subdirectory(parent, name, create=False, within=within)


def refuse_shared(fd: int, name: str) -> None:
    """
    Close ``fd`` and raise ``OSError`` (EMLINK) unless it is a regular file
    with one link: a file popserv writes inside a Maildir (the lock, the
    quota and last-login files) must not be a hard link the user made to a
    file elsewhere (possible where ``fs.protected_hardlinks`` is 0).
    """
    try:
        status = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
        os.close(fd)
        log.warn("Refused {name} in a Maildir: not a file of its own (a hard link?)", name=name)
        raise OSError(errno.EMLINK, f"{name} is not a file of its own")


def _is_symlink(parent: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False
