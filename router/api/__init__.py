"""HTTP routes (router process): every API's handlers, the route list, the app state they share, OpenAPI."""
