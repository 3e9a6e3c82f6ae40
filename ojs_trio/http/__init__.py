"""The OJS HTTP binding: a Quart-Trio app served by Hypercorn."""

from ojs_trio.http.app import create_app
from ojs_trio.http.serve import serve

__all__ = ["create_app", "serve"]
