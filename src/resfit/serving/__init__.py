"""The HTTP service behind ``resfit serve``: dynamic batching and the ASGI app.

:mod:`resfit.serve` parses the command line and runs uvicorn; this package holds what it runs:
:class:`~resfit.serving.batching.Batcher` and :func:`~resfit.serving.app.create_app`.
Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client, python-multipart).
"""
