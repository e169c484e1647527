"""
Logins: twisted.cred credentials and checkers, the password file, OAuth
tokens, account settings and the SASL mechanisms.  Imports the core, and the
interfaces it implements (popserv.interfaces); never a store or the server.
"""
