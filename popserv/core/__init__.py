"""
The pure core: the POP3 wire grammar and the SMTP/LMTP one, body encoding,
errors, user names, safe files and a session's view of its maildrop.  No
Twisted, no zope.interface, and no import from another layer (a test imports
each module with them blocked).
"""
