"""
The server: the POP3 and SMTP/LMTP protocols, TLS, admission and penalties,
the policy, and the services and command line that run them.  May import
every other layer.
"""
