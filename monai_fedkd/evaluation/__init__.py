"""Evaluation of site models, their ensembles and distilled models on test datalists.

See :mod:`monai_fedkd.evaluation.evaluate` for the metrics and the output files.
"""

from monai_fedkd.evaluation import evaluate as _evaluate
from monai_fedkd.evaluation.evaluate import *  # noqa: F401,F403  (the public API is evaluate.__all__)

__all__ = list(_evaluate.__all__)
