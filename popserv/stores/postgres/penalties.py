"""
Failed logins shared by every node (blocking: each function takes a
psycopg connection and runs in one of the database's threads).

Counted by client and by user name tried, as the local table counts them
(:mod:`popserv.server.penalty`), so a successful login forgives only that
user's failures; rows older than the penalty's expiry count for nothing
and are deleted now and then.
"""

from __future__ import annotations

from typing import Any


def failures_of(connection: Any, client: str, expiry: float) -> int:
    """The failed logins from ``client`` within the last ``expiry`` seconds, on any node."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(sum(failures), 0) FROM popserv.login_failures"
            " WHERE client = %s AND last > now() - make_interval(secs => %s)",
            (client, expiry),
        )
        return int(cursor.fetchone()[0])


def record_failure(connection: Any, client: str, user: str, expiry: float) -> int:
    """Count a failed login; return the client's failures, all users together."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO popserv.login_failures AS f (client, username, failures, last)"
            " VALUES (%(client)s, %(user)s, 1, now())"
            " ON CONFLICT (client, username) DO UPDATE SET last = now(), failures ="
            " CASE WHEN f.last > now() - make_interval(secs => %(expiry)s)"
            " THEN f.failures + 1 ELSE 1 END",
            {"client": client, "user": user, "expiry": expiry},
        )
    return failures_of(connection, client, expiry)


def forgive(connection: Any, client: str, user: str) -> None:
    """``user`` logged in from ``client``: forget that user's failures from it."""
    with connection.cursor() as cursor:
        cursor.execute(
            "DELETE FROM popserv.login_failures WHERE client = %s AND username = %s",
            (client, user),
        )


def forget_expired(connection: Any, expiry: float) -> int:
    """Delete the rows that no longer count; return how many."""
    with connection.cursor() as cursor:
        cursor.execute(
            "DELETE FROM popserv.login_failures WHERE last < now() - make_interval(secs => %s)",
            (expiry,),
        )
        return int(cursor.rowcount)
