"""Hyperparameter search: ``resfit tune`` on Optuna (the ``tune`` extra).

``tune(data, trials, out, **fixed)`` runs a study whose trials are normal training runs; the
search space is in :mod:`.space`, the study (storage, claims, pruning) in :mod:`.study`, and
what it leaves in DIR (``trials.csv``, ``best/``, ``report.html``) in :mod:`.results`.
"""

from .cli import add_tune_parser
from .results import TuneResult
from .space import search_space
from .study import tune

__all__ = ["TuneResult", "add_tune_parser", "search_space", "tune"]
