"""Tests of the server layer (popserv.server): protocols, TLS, limits, service."""
