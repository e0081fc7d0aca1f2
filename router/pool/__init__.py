"""Workers (router process): devices and the memory ledger, placement, the ZeroMQ client, the supervisor, each
model's queue and pace, and the pool that gets a model a ready worker (`pool.py`, the facade, with `slots.py`,
`loader.py`, `launch.py` and `eviction.py`)."""
