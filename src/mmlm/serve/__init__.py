"""`mmlm serve`: an OpenAI-compatible HTTP server over mmlm models (engine, app, web page)."""
