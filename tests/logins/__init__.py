"""Tests of the logins layer (popserv.logins): password file, SASL, OAuth."""
