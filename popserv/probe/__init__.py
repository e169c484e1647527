"""
``popserv probe``: a conformance checker for any POP3 server.

It connects as a client, runs a read-only list of checks (greeting, CAPA,
STLS, TLS, LIST sizes against RETR, byte-stuffing, UIDL, TOP, pipelining,
errors, the failed-login delay) and prints one line per check.  It is a
client, so it imports nothing of popserv's server: ``target.py`` (the
URL), ``client.py`` (a blocking client that keeps the bytes),
``syntax.py`` (the grammar, as pure functions), ``session.py`` (what the
checks share), ``checks.py`` (the checks), ``report.py`` (the table and
JSON) and ``command.py`` (the command line).  See docs/probe.rst.
"""
