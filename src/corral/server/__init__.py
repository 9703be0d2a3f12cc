"""`corral serve`: an HTTP front for a corral runtime that speaks ROCK's sandbox API."""

from corral.server.app import create_app

__all__ = ["create_app"]
