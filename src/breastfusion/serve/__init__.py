"""Web service for a bundle: ``breastfusion serve BUNDLE`` (FastAPI + uvicorn), a REST API and a web page.

``create_app(bundle)`` returns the FastAPI app (see :mod:`breastfusion.serve.app`); ``serve(bundle, host=...,
port=...)`` runs it. Scoring from uploaded bytes lives in :mod:`breastfusion.serve.engine`.
"""

from breastfusion.serve.app import create_app, serve
from breastfusion.serve.engine import InputError, ServeModel

__all__ = ["InputError", "ServeModel", "create_app", "serve"]
