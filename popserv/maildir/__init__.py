"""
The default message store: Maildir (cur/ new/ tmp/), as Dovecot, Courier
and most MTAs and mail clients use it.

:class:`MaildirMailbox` serves one locked Maildir to a POP3 session;
:func:`deliver` is the one way popserv puts mail into a Maildir.
"""

from popserv.maildir.deliver import clean_tmp, deliver
from popserv.maildir.lock import LOCK_FILE, MaildropLock
from popserv.maildir.names import MaildirName, make_unique, parse_name, uidl_for, with_flag
from popserv.maildir.store import MaildirMailbox

__all__ = [
    "LOCK_FILE",
    "MaildirMailbox",
    "MaildirName",
    "MaildropLock",
    "clean_tmp",
    "deliver",
    "make_unique",
    "parse_name",
    "uidl_for",
    "with_flag",
]
