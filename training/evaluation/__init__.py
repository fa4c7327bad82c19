"""The evaluation suite behind ``apd evaluate``: the APD paper's experiments on our own runs.

* :mod:`~training.evaluation.methods`: one interface over every posterior method compared
  (SGD, MC-Dropout, SGLD, APD, deep ensemble, a SWAG-style Gaussian).
* :mod:`~training.evaluation.attacks`: FGSM and PGD against a posterior predictive.
* :mod:`~training.evaluation.anomaly`, :mod:`~training.evaluation.adversarial`,
  :mod:`~training.evaluation.active_learning`, :mod:`~training.evaluation.toy2d`,
  :mod:`~training.evaluation.cost`: the experiments.
* :mod:`~training.evaluation.results`: the layout of ``results.json`` (TypedDicts) and its
  checked loader.
* :mod:`~training.evaluation.report`: ``report.md`` + PNG plots + ``results.json``.
* :mod:`~training.evaluation.cli`: the ``apd evaluate`` subcommand.

The metrics (accuracy, NLL, Brier, ECE and reliability diagrams, KL, AUROC / AUPR) are the
pure functions of :mod:`training.metrics`, shared with distillation and training.
"""
