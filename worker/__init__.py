"""SIE worker: one process per loaded model, serving batches from the router over ZeroMQ."""
