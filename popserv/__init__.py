"""
popserv: a POP3 server for Twisted.

The public API: the factory and protocol, the store interfaces, the stores
that ship, and the service builder used by ``twistd popserv``.
"""

__version__ = "0.1.0"
