"""ASGI middleware (router process): URL prefix, metrics, version headers, auth and pool forwarding."""
