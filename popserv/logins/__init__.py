"""
Logins: twisted.cred credentials and checkers, the password file, OAuth
tokens, account settings and the SASL mechanisms.  Imports the core, and the
store interfaces it implements (popserv.stores.interfaces); never the server.
"""
