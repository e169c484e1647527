"""
The PostgreSQL mail store: maildrops, messages and their bytes in a
database every node can reach (see :mod:`popserv.stores.postgres.schema`).
"""
