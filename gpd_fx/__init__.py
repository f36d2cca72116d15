"""gpd_fx: Gap Preserving Distillation as torch.fx graph passes.

    dt = gpd_fx.expand(student, ratio=2, example_inputs=(x,))   # exact, wider dynamic teacher
    loss = ...dt(x)... + ...dt.student(x)...                   # one backward trains both
    plain_student = gpd_fx.fold(dt)                            # the user's own class again
"""

from gpd_fx.errors import (ExpandInputError, FoldError, GPDError, TraceError, UnsupportedOpError,
                           VerificationError)
from gpd_fx.expand import expand
from gpd_fx.param_groups import param_groups
from gpd_fx.passes.fold import fold
from gpd_fx.passes.registry import CannotExpand, register as register_rule
from gpd_fx.scope import ScopedTeacher, ScopeError
from gpd_fx.teacher import DynamicTeacher, ExpansionReport
from gpd_fx.trainer import TrainConfig, TrainResult, train

__all__ = [
    "expand", "fold", "train", "param_groups", "TrainConfig", "TrainResult", "DynamicTeacher", "ScopedTeacher", "ExpansionReport", "register_rule", "CannotExpand",
    "GPDError", "ExpandInputError", "ScopeError", "TraceError", "UnsupportedOpError", "VerificationError", "FoldError",
]
__version__ = "0.1.0"
