"""
Stores: the Maildir, memory and twisted.mail stores, the realms, quota and
delivery.  Imports the core, popserv.interfaces, and logins where a store
needs accounts (the realm and delivery read the password file); never the server.
"""
