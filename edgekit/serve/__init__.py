"""``edgekit serve``: an OpenAI-compatible HTTP server over a bundle's runtime router."""
