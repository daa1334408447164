"""kvtornado: an authenticated key/value HTTP service on Tornado with a write-behind sqlite cache."""

__version__ = "0.1.0"
