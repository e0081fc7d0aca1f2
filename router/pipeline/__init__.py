"""The request pipeline (router process): a request resolved once into a typed job, run through its model's queue,
and its outputs post-processed; content negotiation for every route."""
