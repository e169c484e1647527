"""
The ``twisted.cred`` checker for a passwd-file.

USER/PASS and SASL PLAIN arrive as ``IUsernamePassword``; the password is
hashed and compared in the reactor's thread pool, as argon2 keeps a core
busy for tens of milliseconds.  APOP (and later CRAM-MD5) arrive as
``IUsernameHashedPassword``, which can only be checked against a stored
plaintext (``{PLAIN}``): for any other scheme the login fails, and the log
says why.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

if TYPE_CHECKING:
    from popserv.logins.sqlaccounts import SQLAccounts

from popserv.core.errors import InvalidUsername, TemporaryFailure
from popserv.core.usernames import loggable_username
from popserv.interfaces import IScramKeySource, ISecretInventory
from popserv.logins.credentials import (
    IActAsPasswordCredentials,
    ICramMD5Credentials,
    IExternalCredentials,
    IScramCredentials,
)
from popserv.logins.passwords.passwdfile import PasswdFile, UserEntry
from popserv.logins.passwords.schemes import (
    DEFAULT_SCHEME,
    UnknownScheme,
    cram_md5_context,
    hash_parameters,
    hash_password,
    plaintext_secret,
    scheme_of,
    stored_scram_keys,
    verify_password,
)
from popserv.logins.passwords.scram import ScramKeys, derived_salt

log = Logger()
T = TypeVar("T")


def usable_for(kind: str, stored: str) -> bool:
    """Whether a stored password field lets ``kind`` of login be checked."""
    if plaintext_secret(stored) is not None:
        return True
    if kind == "cram-md5":
        return cram_md5_context(stored) is not None
    if kind.startswith("scram-"):
        return stored_scram_keys(stored, kind.removeprefix("scram-").upper()) is not None
    return False


#: Keys derived from a PLAIN password, kept for the checker's second look in
#: the same login (and the next ones): PBKDF2 is deliberately slow.  The salt
#: and inputs are fixed while the server runs, so the keys are too.
_derive_keys = lru_cache(maxsize=1024)(ScramKeys.derive)


def _first(read: Callable[[str], T | None], secrets: Iterable[str]) -> T | None:
    """The first of a user's stored secrets that ``read`` can use, read."""
    for secret in secrets:
        found = read(secret)
        if found is not None:
            return found
    return None


#: Schemes checked at once on the reactor thread: a comparison, no hashing
#: worth a trip through the thread pool.  Only a success is answered at
#: once: a failure goes on to the thread pool like an unknown user's.
_INSTANT_SCHEMES = frozenset({"PLAIN"})


@cache
def dummy_hash() -> str:
    """
    A hash of a random password in the default scheme, made once per
    process (the checker makes it when built, so no login pays for it):
    what a failed password check verifies when the user's own field would
    have cost less, so that the time taken does not tell them apart.
    """
    return hash_password(secrets.token_urlsafe(16), DEFAULT_SCHEME)


def _as_costly_as_dummy(stored: str) -> bool:
    """Whether checking ``stored`` takes the work checking the dummy hash does."""
    parameters = hash_parameters(stored)
    return parameters is not None and parameters == hash_parameters(dummy_hash())


def _verify(stored: str | None, password: str | bytes) -> bool:
    """
    Runs in the thread pool.  Every failure costs at least one check of the
    dummy hash: an unknown user's (``stored`` None) is just that, and a
    wrong password for a field cheaper than it (PLAIN, a salted SHA, a
    locked account, argon2 with lower costs, a broken entry) checks it too.
    The default scheme's users, the usual case, fail in exactly the time
    an unknown name does; a success is never delayed.
    """
    if stored is None:
        verify_password(dummy_hash(), password)
        return False
    try:
        if verify_password(stored, password):
            return True
    except UnknownScheme:
        verify_password(dummy_hash(), password)
        raise
    if not _as_costly_as_dummy(stored):
        verify_password(dummy_hash(), password)
    return False


@implementer(ICredentialsChecker, ISecretInventory, IScramKeySource)
class PasswdFileChecker:
    """
    Checks logins against a :class:`PasswdFile`; the avatar id is the user
    name as the file stores it (the one its Maildir is named after), whatever
    form of it the client gave: every name is looked up normalised, under
    the file's :class:`~popserv.core.usernames.UsernameRules` (NFKC, case folded
    by default, mixed scripts refused).

    Fails with ``UnauthorizedLogin`` for a wrong password or an unknown user
    (after the same work, so the time taken does not tell them apart), and
    with :class:`popserv.core.errors.TemporaryFailure` when the file cannot be
    read, so the client hears ``[SYS/TEMP]`` rather than a wrong password.
    """

    credentialInterfaces = (
        IUsernamePassword,
        IUsernameHashedPassword,
        IScramCredentials,
        IExternalCredentials,
        IActAsPasswordCredentials,
    )

    def __init__(
        self,
        passwd: PasswdFile | SQLAccounts,
        reactor: Any = None,
        masters: Iterable[str] = (),
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        dummy_hash()
        self.passwd = passwd
        #: Users who may log in as any other (SASL authzid), e.g. for migrations;
        #: normalised like every name (an invalid one is a configuration error).
        self.masters = frozenset(passwd.rules.normalize(name) for name in masters)
        self._reactor = reactor
        self._coverage: tuple[object, dict[str, str]] | None = None

    def coverage(self, kind: str) -> str:
        """
        How many users have a stored secret that ``kind`` of login can check;
        ``some`` for accounts that cannot be listed (a database's query finds
        one user at a time).
        """
        if not hasattr(self.passwd, "users"):
            return "some"
        try:
            users = self.passwd.users()
        except OSError:
            return "none"
        cached = self._coverage
        if cached is None or cached[0] is not users:
            self._coverage = cached = (users, {})
        known = cached[1]
        if kind not in known:
            usable = [
                not entry.locked and any(usable_for(kind, s) for s in entry.secrets)
                for entry in users
            ]
            known[kind] = "all" if usable and all(usable) else "some" if any(usable) else "none"
        return known[kind]

    # Twisted types avatar ids as bytes; popserv's are str (normalized user
    # names), which Portal hands to the realm untouched.
    def requestAvatarId(self, credentials: Any) -> Deferred[str]:  # type: ignore[override]
        """Fire with the user name as ``str`` when ``credentials`` are right."""
        return Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, credentials: Any) -> str:
        entry = await self._authenticate(credentials)
        return await self._act_as(entry, getattr(credentials, "authzid", None))

    def _login_name(self, username: str | bytes) -> str | None:
        """
        A login's user name, UTF-8 and normalised (RFC 6856 section 2.2:
        SASLprep, so ``ALICE`` in full-width letters is ``alice`` or, with
        case kept, ``ALICE``); None when it can be no user's name.
        """
        if isinstance(username, bytes):
            try:
                username = username.decode("utf-8")
            except UnicodeDecodeError:
                return None
        try:
            return self.passwd.rules.normalize(username)
        except InvalidUsername:
            return None

    async def _act_as(self, entry: UserEntry, authzid: str | None) -> str:
        """
        The avatar id: ``entry``'s user, or the user it asked to act as (SASL
        authzid) when it is one of the admin's master users and that user exists.
        """
        if not authzid:
            return entry.name
        other = self._login_name(authzid)
        if other is None:
            raise UnauthorizedLogin()
        name = self.passwd.rules.normalize(entry.name)
        if other == name:
            return entry.name
        if name not in self.masters:
            log.info(
                "{user} may not log in as {other}", user=entry.name, other=loggable_username(other)
            )
            raise UnauthorizedLogin()
        target = await self._entry(other)
        if target is None:
            raise UnauthorizedLogin()
        log.info("Master user {master} logs in as {user}", master=entry.name, user=target.name)
        return target.name

    async def _authenticate(self, credentials: Any) -> UserEntry:
        name = self._login_name(credentials.username)
        if IUsernamePassword.providedBy(credentials) or IActAsPasswordCredentials.providedBy(
            credentials
        ):
            # Before the name is judged: a name that can be no user's costs
            # the same check as an unknown one.
            return await self._check_password(name, credentials.password)
        if name is None:
            raise UnauthorizedLogin()
        if IUsernameHashedPassword.providedBy(credentials):
            return await self._check_hashed(name, credentials)
        entry = await self._entry(name)
        if IExternalCredentials.providedBy(credentials):
            # The TLS layer verified who it is; the account must exist and not be locked.
            if entry is None or entry.locked:
                raise UnauthorizedLogin()
            return entry
        if IScramCredentials.providedBy(credentials):
            keys = await self._keys_of(entry, name, credentials.hash_name)
            if entry is not None and keys is not None and credentials.verify(keys):
                return entry
            raise UnauthorizedLogin()
        raise UnhandledCredentials(f"{type(credentials).__name__} is not handled")

    async def _check_password(self, name: str | None, password: str | bytes) -> UserEntry:
        if not password:
            raise UnauthorizedLogin()
        entry = None if name is None else await self._entry(name)
        stored = None if entry is None else entry.password
        pool = self._reactor.getThreadPool()
        try:
            if stored is not None and scheme_of(stored) in _INSTANT_SCHEMES:
                matches = verify_password(stored, password)
                if not matches:
                    await deferToThreadPool(self._reactor, pool, _verify, None, password)
            else:
                matches = await deferToThreadPool(self._reactor, pool, _verify, stored, password)
        except UnknownScheme as e:
            log.error(
                "Cannot check the password of {user} (scheme {scheme}): {why}",
                user=name,
                scheme=scheme_of(stored or ""),
                why=str(e),
            )
            raise UnauthorizedLogin() from None
        if entry is None:
            log.debug("Login as unknown user {user}", user=loggable_username(name))
        if not matches or entry is None:
            raise UnauthorizedLogin()
        return entry

    async def _check_hashed(self, name: str, credentials: Any) -> UserEntry:
        entry = await self._entry(name)
        if entry is None or entry.locked:
            log.debug("Login as unknown or locked user {user}", user=name)
            raise UnauthorizedLogin()
        plain = _first(plaintext_secret, entry.secrets)
        if plain is not None:
            if await maybeDeferred(credentials.checkPassword, plain):
                return entry
            raise UnauthorizedLogin()
        context = _first(cram_md5_context, entry.secrets)
        if context is not None and ICramMD5Credentials.providedBy(credentials):
            if credentials.checkContext(context):
                return entry
            raise UnauthorizedLogin()
        log.info(
            "{user} cannot log in with {kind}: it needs a PLAIN password (or, for"
            " CRAM-MD5, a CRAM-MD5 one); the stored one is {scheme}",
            user=entry.name,
            kind=type(credentials).__name__.removesuffix("Credentials"),
            scheme="+".join(entry.schemes),
        )
        raise UnauthorizedLogin()

    def scram_keys(self, username: str, hash_name: str) -> Deferred[ScramKeys | None]:
        """
        The user's SCRAM keys: the stored ``{SCRAM-SHA-...}`` entry, or keys
        derived from a PLAIN password (in the thread pool: PBKDF2 is slow on
        purpose).  For an unknown user, or one whose password is only a hash
        SCRAM cannot use (the log says why), decoys salted by the normalised
        name: ``ALICE`` and ``alice`` get one salt whether or not alice
        exists, as they would if she did.
        """
        return Deferred.fromCoroutine(self._scram_keys(username, hash_name))

    async def _scram_keys(self, username: str, hash_name: str) -> ScramKeys:
        name = self._login_name(username)
        entry = None if name is None else await self._entry(name)
        keys = await self._keys_of(entry, name, hash_name)
        if keys is None:
            keys = ScramKeys.decoy(hash_name, derived_salt(hash_name, name or username))
        return keys

    async def _keys_of(
        self, entry: UserEntry | None, name: str | None, hash_name: str
    ) -> ScramKeys | None:
        """``entry``'s SCRAM keys (see :meth:`scram_keys`); ``name`` is its lookup key."""
        if entry is None or entry.locked or name is None:
            return None
        keys = _first(lambda secret: stored_scram_keys(secret, hash_name), entry.secrets)
        if keys is not None:
            return keys
        plain = _first(plaintext_secret, entry.secrets)
        if plain is None:
            log.info(
                "{user} cannot log in with SCRAM-{hash}: it needs a PLAIN or SCRAM-{hash}"
                " password; the stored one is {scheme}",
                user=entry.name,
                hash=hash_name,
                scheme="+".join(entry.schemes),
            )
            return None
        salt = derived_salt(hash_name, name)
        pool = self._reactor.getThreadPool()
        derive = _derive_keys
        try:
            return await deferToThreadPool(self._reactor, pool, derive, hash_name, plain, salt)
        except ValueError as e:
            # A stored password SASLprep refuses: SCRAM cannot work for it.
            log.info("{user} cannot log in with SCRAM: {why}", user=entry.name, why=str(e))
            return None

    async def _entry(self, name: str) -> UserEntry | None:
        """
        The account named ``name``: from the password file at once, from a
        database (:class:`~popserv.logins.sqlaccounts.SQLAccounts`) when its
        query answers; a database that cannot answer is a TemporaryFailure.
        """
        try:
            found = self.passwd.lookup(name)
            if isinstance(found, Deferred):
                found = await found
            return found
        except OSError as e:
            log.error(
                "Cannot read the password file {path}: {error}",
                path=str(getattr(self.passwd, "path", "")),
                error=e.strerror or e.__class__.__name__,
            )
            raise TemporaryFailure("password file unreadable") from None
