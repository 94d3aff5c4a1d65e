"""The influence service: a thin FastAPI layer over the `influence` library."""
