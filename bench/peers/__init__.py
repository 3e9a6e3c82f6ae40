"""Peer job queues run on the same PostgreSQL, each in its own asyncio subprocess.

Every runner takes ``--dsn --jobs --concurrency --batch`` and prints one JSON object
on stdout (see :func:`bench.peers.common.report`).  They need the ``bench`` extra
(``pip install -e '.[bench]'``); the harness reports a peer as unavailable when its
library cannot be imported.
"""
