"""The public API: the names in ``popserv.__all__``, imported lazily from the layers."""

from __future__ import annotations

import importlib

from twisted.trial.unittest import SynchronousTestCase

import popserv


class PublicAPITests(SynchronousTestCase):
    def test_every_name_resolves(self):
        """Each name in ``popserv.__all__`` is there, imported from its module on first use."""
        for name in popserv.__all__:
            self.assertIsNotNone(getattr(popserv, name), name)

    def test_every_name_has_a_module(self):
        """``_EXPORTS`` names a module for each public name, and the name is defined there."""
        self.assertEqual(set(popserv._EXPORTS), set(popserv.__all__) - {"__version__"})
        for name, module in popserv._EXPORTS.items():
            self.assertTrue(module == "popserv.interfaces" or module.startswith(
                ("popserv.logins.", "popserv.stores.", "popserv.server.")), module)
            self.assertIs(getattr(importlib.import_module(module), name), getattr(popserv, name))

    def test_unknown_name(self):
        with self.assertRaises(AttributeError):
            popserv.no_such_name

    def test_dir(self):
        self.assertEqual(dir(popserv), sorted(popserv.__all__))
