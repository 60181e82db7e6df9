"""The HTTP service behind ``resfit serve``: dynamic batching and the ASGI app.

:mod:`resfit.apps.serve` parses the command line and runs uvicorn; this package holds what it runs:
:class:`~resfit.apps.serving.batching.Batcher` and :func:`~resfit.apps.serving.app.create_app`.
Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client, python-multipart).
"""
