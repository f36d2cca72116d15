"""Reusable exactness checks for ``gpd_fx.expand``, shared by the test suite and the zoo sweep.

* :mod:`~gpd_fx.testing.specs`: the model catalogue (:class:`Spec`, :func:`torchvision_specs`,
  :func:`timm_specs`): which models, built how, with which example inputs.
* :mod:`~gpd_fx.testing.checks`: :func:`rel_error`, :func:`randomize_constants` (so that no
  check passes vacuously on a zero head), :func:`zero_dropout`, :func:`model_kind`.
* :mod:`~gpd_fx.testing.measurement`: :func:`measure` builds one model, expands it and returns a
  :class:`Row` (exact in eval and train mode, FLOP share, fold/export), never raising.
* :mod:`gpd_fx.testing.zoo` (not imported here): the sweep's command line, one worker
  subprocess per model, the table; ``gpd-fx zoo`` and ``benchmarks/zoo.py`` run it.

Exactness is judged against the project's one tolerance table, :data:`TOL`
(``gpd_fx.passes.widen_verify.TOL``).

Example:
    >>> from gpd_fx.testing import Spec, measure
    >>> row = measure(Spec("torchvision", "squeezenet1_1", image_size=64), 2, dtype="float64",
    ...               check_free_memory=False)  # doctest: +SKIP
    >>> row.exact, row.share  # doctest: +SKIP
    (True, 1.0)
"""

from gpd_fx.passes.widen_verify import TOL

from .checks import model_kind, randomize_constants, rel_error, tree_tensors, zero_dropout
from .measurement import (CNN_SHARE, TRANSFORMER_SHARE, UNDER_WIDENED, Row, activation_numel, estimate_gib,
                      measure, timm_fx_check)
from .specs import (BATCH, DEFAULT_IMAGE, DETECTION_IMAGE, TASKS, Spec, family, timm_param_counts, timm_specs,
                    torchvision_specs)

__all__ = ["BATCH", "CNN_SHARE", "DEFAULT_IMAGE", "DETECTION_IMAGE", "TASKS", "TOL", "TRANSFORMER_SHARE",
           "UNDER_WIDENED", "Row", "Spec", "activation_numel", "estimate_gib", "family", "measure",
           "model_kind", "randomize_constants", "rel_error", "timm_fx_check", "timm_param_counts",
           "timm_specs", "torchvision_specs", "tree_tensors", "zero_dropout"]
