"""The evaluation suite behind ``apd evaluate``: the APD paper's experiments on our own runs.

* :mod:`~training.evaluation.metrics`: pure metric functions (accuracy, NLL, Brier, ECE and
  reliability diagrams, AUROC / AUPR for anomaly detection).
* :mod:`~training.evaluation.methods`: one interface over every posterior method compared
  (SGD, MC-Dropout, SGLD, APD, deep ensemble, a SWAG-style Gaussian).
* :mod:`~training.evaluation.attacks`: FGSM and PGD against a posterior predictive.
* :mod:`~training.evaluation.anomaly`, :mod:`~training.evaluation.adversarial`,
  :mod:`~training.evaluation.active_learning`, :mod:`~training.evaluation.toy`,
  :mod:`~training.evaluation.cost`: the experiments.
* :mod:`~training.evaluation.report`: ``report.md`` + PNG plots + ``results.json``.
* :mod:`~training.evaluation.cli`: the ``apd evaluate`` subcommand.
"""
