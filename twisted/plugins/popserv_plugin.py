"""Makes ``twistd popserv`` available once popserv is installed."""

from twisted.application.service import ServiceMaker

popserv = ServiceMaker(
    "popserv",
    "popserv.server.service",
    "A POP3 server: Maildir storage, twisted.cred logins, TLS.",
    "popserv",
)
