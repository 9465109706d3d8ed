"""The HTTP boundary: the FastAPI app and its routes. Only modules in this package import FastAPI or
Starlette; everything they call knows nothing of HTTP."""
