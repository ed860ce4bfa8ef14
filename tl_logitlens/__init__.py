"""tl_logitlens: the logit lens and direct logit attribution for TransformerLens.

"What does each layer predict?" and "which layer, head or neuron wrote this answer?",
answered exactly on every TransformerLens model (HookedTransformer on 2.x/3.x,
TransformerBridge on 3.x/4.x, folded or not) and fast on real ones.

Importing the package is cheap: the analyses (and torch, transformer_lens, matplotlib,
pandas behind them) are imported the first time one of their names is used.

Example::

    >>> import tl_logitlens as tll
    >>> model = tll.demo_model()
    >>> result = tll.logit_lens(model, tll.demo.induction_prompt(model), targets="next")
    >>> result.labels
    ['0_pre', '1_pre', 'final_post']
"""

import importlib
import importlib.abc
import importlib.util
import sys
import types
from typing import Any, List

# Cheap modules (no torch, no transformer_lens): imported eagerly.
from .errors import (
    LensInputError,
    MissingHooksError,
    ModelStateError,
    NonFiniteActivationError,
    UnsupportedModelError,
)
from .tokentext import display_token

__version__ = "0.1.0"

# Public name -> the submodule that defines it, imported on first use (PEP 562), so that
# `import tl_logitlens` and `tl-logitlens --help` import neither torch-heavy transformer_lens
# nor matplotlib nor pandas.
_LAZY = {
    "Attribution": "attribution",
    "direct_logit_attribution": "attribution",
    "demo_model": "demo",
    "LensComparison": "evaluate",
    "LensEvaluation": "evaluate",
    "JacobianLens": "lenses",
    "Lens": "lenses",
    "LogitLens": "lenses",
    "TunedLens": "lenses",
    "compare_lenses": "evaluate",
    "evaluate_lens": "evaluate",
    "IDENTITY_PROMPT": "patchscopes",
    "LensResult": "lens",
    "logit_lens": "lens",
    "patchscope": "patchscopes",
    "patchscope_generate": "patchscopes",
    "plot_attribution": "plots",
    "plot_attribution_positions": "plots",
    "plot_group_trajectory": "plots",
    "plot_layer_curves": "plots",
    "plot_lens": "plots",
    "plot_lens_comparison": "plots",
    "plot_lens_metrics": "plots",
    "plot_source_attribution": "plots",
    "plot_trajectory": "plots",
    "save_figure": "plots",
    "Readout": "readout",
    "readout": "readout",
    "ResidualStack": "stacks",
    "residual_stack": "stacks",
    "set_chunk_budget": "kernel.tuning",
    "source_token_rate": "patchscopes",
    "train_tuned_lens": "lenses",
    "RunComparison": "divergence",
    "compare_runs": "divergence",
    "LatentLanguage": "latent",
    "latent_language": "latent",
    "word_tokens": "latent",
    "report": "audit",
    "fit_jacobian_lens": "lenses",
}
_SUBMODULES = ("demo",)

# Modules that moved when the package was split into layers (kernel/, inputs/, lenses/,
# evaluate/): the old import paths are the new modules themselves (see _MovedModules).
_MOVED = {
    "norm": "kernel.norm",
    "tiles": "kernel.tiles",
    "tuning": "kernel.tuning",
    "train_kernel": "kernel.loss",
    "tokens": "inputs.tokens",
    "data": "inputs.data",
    "running": "evaluate.running",
    "stream": "evaluate.stream",
    "compare": "evaluate.compare",
    "train": "lenses.training.tuned",
}

__all__ = [
    "Attribution",
    "DEFAULT_CHUNK_BUDGET_BYTES",
    "IDENTITY_PROMPT",
    "JacobianLens",
    "Lens",
    "LensComparison",
    "LensEvaluation",
    "LensInputError",
    "LensResult",
    "LogitLens",
    "MissingHooksError",
    "ModelStateError",
    "NonFiniteActivationError",
    "Readout",
    "ResidualStack",
    "TunedLens",
    "UnsupportedModelError",
    "compare_lenses",
    "compare_runs",
    "RunComparison",
    "LatentLanguage",
    "latent_language",
    "word_tokens",
    "report",
    "demo",
    "demo_model",
    "direct_logit_attribution",
    "display_token",
    "evaluate_lens",
    "fit_jacobian_lens",
    "logit_lens",
    "patchscope",
    "patchscope_generate",
    "plot_attribution",
    "plot_attribution_positions",
    "plot_group_trajectory",
    "plot_layer_curves",
    "plot_lens",
    "plot_lens_comparison",
    "plot_lens_metrics",
    "plot_source_attribution",
    "plot_trajectory",
    "readout",
    "residual_stack",
    "save_figure",
    "set_chunk_budget",
    "source_token_rate",
    "train_tuned_lens",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        if name != "readout":  # see _Package: the submodule of that name must not shadow it
            globals()[name] = value
        return value
    if name in _SUBMODULES or name in _MOVED:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module, with ``readout`` always the function.

    Importing the submodule ``tl_logitlens.readout`` (which any analysis does) makes the
    import system set the package attribute ``readout`` to that module; this property keeps
    ``tll.readout`` the function, as it was when the package imported it eagerly.
    """

    @property
    def readout(self) -> Any:
        override = self.__dict__.get("_readout_override")
        if override is not None:
            return override
        return importlib.import_module(".readout", __name__).readout

    @readout.setter
    def readout(self, value: Any) -> None:
        if not isinstance(value, types.ModuleType):  # a user's assignment wins; the import system's not
            self.__dict__["_readout_override"] = value

    @property
    def DEFAULT_CHUNK_BUDGET_BYTES(self) -> int:
        """The kernel's default memory budget in bytes (read-only: see :func:`set_chunk_budget`)."""
        return importlib.import_module(".kernel.tuning", __name__).CPU_BUDGET_BYTES

    @DEFAULT_CHUNK_BUDGET_BYTES.setter
    def DEFAULT_CHUNK_BUDGET_BYTES(self, value: Any) -> None:
        # Assigning the constant would change nothing: say so, and name the knob that works.
        raise AttributeError(
            "tl_logitlens.DEFAULT_CHUNK_BUDGET_BYTES is the default, not a setting; change the "
            f"kernel's memory budget with tl_logitlens.set_chunk_budget({value!r}) "
            "(None goes back to the measured default), or pass chunk_size= per call"
        )


sys.modules[__name__].__class__ = _Package


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import tl_logitlens.tuning`` (an old path) gives ``tl_logitlens.kernel.tuning`` itself.

    The same module object, not a copy, so that settings and monkeypatches made through the
    old path reach the code that reads them.
    """

    _specs: dict = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        prefix, _, name = fullname.rpartition(".")
        if prefix != __name__ or name not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        module = importlib.import_module(f"{__name__}.{_MOVED[spec.name.rpartition('.')[2]]}")
        self._specs[spec.name] = module.__spec__  # the import system stamps the alias's spec on it
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self._specs.pop(module.__spec__.name)  # ... and here it is put back


sys.meta_path.append(_MovedModules())
