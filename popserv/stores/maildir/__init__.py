"""
The default message store: Maildir (cur/ new/ tmp/), as Dovecot, Courier
and most MTAs and mail clients use it.

:class:`MaildirMailbox` serves one locked Maildir to a POP3 session;
:func:`deliver` is the one way popserv puts mail into a Maildir;
:func:`parse_uidl_format` reads a ``--uidl-format`` (UIDLs Dovecot served).
"""

from popserv.stores.maildir.deliver import clean_tmp, deliver
from popserv.stores.maildir.index import INDEX_FILE
from popserv.stores.maildir.lock import LOCK_FILE, MaildropLock
from popserv.stores.maildir.mailbox import MaildirMailbox
from popserv.stores.maildir.names import MaildirName, make_unique, parse_name, uidl_for, with_flag
from popserv.stores.maildir.uidlist import UIDLIST_FILE
from popserv.stores.maildir.uidls import UidlScheme, parse_uidl_format

__all__ = [
    "INDEX_FILE",
    "LOCK_FILE",
    "UIDLIST_FILE",
    "MaildirMailbox",
    "MaildirName",
    "MaildropLock",
    "UidlScheme",
    "clean_tmp",
    "deliver",
    "make_unique",
    "parse_name",
    "parse_uidl_format",
    "uidl_for",
    "with_flag",
]
