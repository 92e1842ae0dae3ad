"""The density-estimation service: a FastAPI app with one fair chunked scheduler per model, and its Python client.

Imports models/ only (never training/). Run it with `iwae serve` or `python -m service`; see docs/service.md.
"""
