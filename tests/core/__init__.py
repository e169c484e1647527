"""Tests of the pure core (popserv.core)."""
