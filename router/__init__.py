"""SIE router: the HTTP front (Starlette) that batches requests and sends them to model workers over ZeroMQ."""

__version__ = "0.1.0"
# The SIE wire version we implement; sent as X-SIE-Server-Version so the upstream SDK sees no skew.
WIRE_VERSION = "0.10.1"
