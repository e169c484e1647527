"""
The transport the protocols run on, as a type for mypy.

Twisted types ``Protocol.transport`` as ``ITransport | None``: set by
``makeConnection``, and naming only the methods every transport has.  The
sessions run only once connected, on a TCP connection (or its TLS wrapper,
or a UNIX socket) that is also a consumer, a push producer and a system
handle, and they use all of that.  :class:`IStreamTransport` names those
interfaces together, as Twisted's own ``portforward._MakeTypesHappy`` does,
so that each call is checked against the interface that defines it.

It is only an annotation: nothing declares it, and no code asks
``providedBy`` of it.  ``startTLS`` is only called where a TLS server side
is configured, which a UNIX socket never has.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    ISystemHandle,
    ITLSTransport,
)
from zope.interface import Attribute


class IStreamTransport(ITLSTransport, IConsumer, IPushProducer, ISystemHandle):
    """A connected stream transport, as ``twisted.internet.tcp.Connection`` is."""

    disconnecting = Attribute("True once loseConnection() was called (abstract.FileDescriptor).")
