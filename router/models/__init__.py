"""Models (router process): the model-config schema, the served registry, family inference, weights on disk."""
