"""popserv's tests, run with ``python -m twisted.trial tests``."""

from hypothesis import settings

# The same examples on every run and machine, so a failure always reproduces;
# no example database written into the checkout.
settings.register_profile("popserv", derandomize=True, database=None, deadline=None)
settings.load_profile("popserv")
