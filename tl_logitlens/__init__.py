"""tl_logitlens: the logit lens and direct logit attribution for TransformerLens.

"What does each layer predict?" and "which layer, head or neuron wrote this answer?",
answered exactly on every TransformerLens model (HookedTransformer on 2.x/3.x,
TransformerBridge on 3.x/4.x, folded or not) and fast on real ones.

Example::

    >>> import tl_logitlens as tll
    >>> model = tll.demo_model()
    >>> result = tll.logit_lens(model, tll.demo.induction_prompt(model), targets="next")
    >>> result.labels
    ['0_pre', '1_pre', 'final_post']
"""

from . import demo
from .attribution import Attribution, direct_logit_attribution
from .demo import demo_model
from .errors import (
    LensInputError,
    MissingHooksError,
    ModelStateError,
    NonFiniteActivationError,
    UnsupportedModelError,
)
from .evaluate import LensEvaluation, evaluate_lens
from .lens import LensResult, logit_lens
from .plots import (
    plot_attribution,
    plot_attribution_positions,
    plot_layer_curves,
    plot_lens,
    plot_lens_metrics,
    plot_trajectory,
)
from .readout import DEFAULT_CHUNK_BUDGET_BYTES, Readout, readout
from .stacks import ResidualStack, residual_stack
from .tokentext import display_token

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "DEFAULT_CHUNK_BUDGET_BYTES",
    "LensEvaluation",
    "LensInputError",
    "LensResult",
    "MissingHooksError",
    "ModelStateError",
    "NonFiniteActivationError",
    "Readout",
    "ResidualStack",
    "UnsupportedModelError",
    "demo",
    "demo_model",
    "direct_logit_attribution",
    "display_token",
    "evaluate_lens",
    "logit_lens",
    "plot_attribution",
    "plot_attribution_positions",
    "plot_layer_curves",
    "plot_lens",
    "plot_lens_metrics",
    "plot_trajectory",
    "readout",
    "residual_stack",
]
