"""Tests of the stores (popserv.stores): Maildir, delivery, quota, twisted.mail."""
