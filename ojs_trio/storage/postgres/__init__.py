"""PostgreSQL storage adapter (psycopg 3 driven natively by Trio).

The Trio driver layer lives in :mod:`ojs_trio.storage.postgres.driver`; import it
from there, so that importing this package never pulls in psycopg.
"""
