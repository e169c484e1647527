"""
The pure core: the POP3 wire grammar, body encoding, errors, user names and
a session's view of its maildrop.  No I/O, no Twisted, no zope.interface;
it imports nothing from the other layers (a test imports it with Twisted blocked).
"""
