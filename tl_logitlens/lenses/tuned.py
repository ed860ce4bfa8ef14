"""The tuned lens (Belrose et al. 2023): one trained affine translator per stack entry.

:class:`TunedLens` holds one translator ``h + h @ A.T + b`` per entry below ``final_post``.
Files follow EleutherAI tuned-lens 0.2.0's format (``config.json`` and ``params.pt``), so
lenses travel between the two packages; our extras (``_mid`` translators, the entry labels)
live in ``tl_logitlens.json`` and ``tl_logitlens_extra.pt``, which tuned-lens ignores.
Training is :func:`tl_logitlens.lenses.training.train_tuned_lens`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from ..errors import LensInputError, ModelStateError
from ..files import OwnedFolder
from ..model_access import describe, stream_change, unembed_hash, unembed_matches, unembed_sample
from ..stacks import stack_labels
from .base import Lens, ModelSignature

_CONFIG = "config.json"
_PARAMS = "params.pt"
_EXTRA_JSON = "tl_logitlens.json"
_EXTRA_PARAMS = "tl_logitlens_extra.pt"
_EXTRA_FORMAT = "tl_logitlens.TunedLens/1"
_LENS_TYPE = "linear_tuned_lens"


def _refuse_changed_stream(model: Any, doing: str) -> None:
    why = stream_change(model)
    if why is not None:
        raise ModelStateError(
            f"cannot {doing}: a tuned lens in the tuned-lens format is defined on the Hugging Face "
            f"residual stream, and this model's stream differs from it because {why}. Load the model "
            "without that processing instead: TransformerBridge.boot_transformers(...) without "
            "enable_compatibility_mode(), or HookedTransformer.from_pretrained_no_processing(...) "
            "(or from_pretrained(..., center_writing_weights=False))."
        )


class TunedLens(torch.nn.Module, Lens):
    """One affine translator per stack entry below ``final_post``: ``h + h @ A.T + b``.

    ``A [d_model, d_model]`` and ``b [d_model]`` start at zero, so a new lens is the
    identity (the logit lens), as in Belrose et al. (2023). Parameters are float32 on the
    model's unembedding device; ``transform`` casts ``h`` to float32. ``final_post`` is read
    untransformed; any other label without a translator is refused.

    Args:
        model: the ``HookedTransformer`` or ``TransformerBridge`` the lens reads.
        incl_mid: also translate the ``L_mid`` entries.

    Attributes:
        labels: the entries with a translator (``0_pre, [0_mid,] 1_pre, ...``).
        translators: ``torch.nn.ModuleDict`` label -> ``torch.nn.Linear`` holding ``A``
            (``weight``) and ``b`` (``bias``).
        d_model, n_layers, incl_mid, model_name, unembed_hash, unembed_sample: what the lens was
            built for (:meth:`built_for`; the unembedding's tuned-lens hash and our
            dtype-proof :func:`~tl_logitlens.model_access.unembed_sample`).

    Example::

        >>> import torch
        >>> import tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> lens = tll.TunedLens(model)
        >>> lens.labels
        ['0_pre', '1_pre']
        >>> h = torch.randn(2, model.cfg.d_model)
        >>> bool(torch.equal(lens.transform(h, "1_pre"), h))  # the identity at the start
        True
    """

    name = "tuned"
    identity_at_final = True  # final_post has no translator

    def __init__(self, model: Any, incl_mid: bool = False) -> None:
        super().__init__()
        facts = describe(model)
        self.d_model, self.n_layers, self.model_name = facts.d_model, facts.n_layers, facts.model_name
        self.incl_mid = bool(incl_mid)
        self.unembed_hash = unembed_hash(model)
        self.unembed_sample = unembed_sample(model)
        self.stream_change = stream_change(model)
        device = facts.device
        self.labels: List[str] = stack_labels(self.n_layers, self.incl_mid)[:-1]
        self.translators = torch.nn.ModuleDict()
        for label in self.labels:
            layer = torch.nn.Linear(self.d_model, self.d_model, bias=True, device=device, dtype=torch.float32)
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
            self.translators[label] = layer

    def transform(self, h: torch.Tensor, label: str) -> torch.Tensor:
        """``h + h @ A.T + b`` with the translator of ``label``, in float32 on the lens's device."""
        if label == "final_post":
            return h.float()
        if label not in self.translators:
            hint = (
                " (build or train the lens with incl_mid=True for _mid entries)" if str(label).endswith("_mid") else ""
            )
            raise LensInputError(
                f"this TunedLens has no translator for stack entry {label!r}{hint}; it has {self.labels}"
                " and reads final_post untransformed"
            )
        layer = self.translators[label]
        h = h.to(device=layer.weight.device, dtype=torch.float32)
        return h + layer(h)

    def forward(self, h: torch.Tensor, label: str) -> torch.Tensor:
        return self.transform(h, label)

    def built_for(self) -> ModelSignature:
        """The model this lens was built (or loaded) for: its sizes, unembedding and the entries it reads."""
        return ModelSignature(
            self.n_layers, self.d_model, list(self.unembed_sample), (*self.labels, "final_post"), self.model_name
        )

    def __repr__(self) -> str:
        return (
            f"TunedLens({len(self.labels)} translators, d_model={self.d_model}, n_layers={self.n_layers}, "
            f"incl_mid={self.incl_mid})"
        )

    # -- files ------------------------------------------------------------------------------
    def save(self, directory: Union[str, Path], *, overwrite: bool = False) -> None:
        """Write the lens to ``directory`` in tuned-lens 0.2.0's format (plus our extras).

        ``config.json`` and ``params.pt`` (keys ``"{i}.weight"`` ``[d_model, d_model]`` and
        ``"{i}.bias"`` ``[d_model]``, translator ``i`` reading ``i_pre``) load in tuned-lens;
        ``tl_logitlens.json`` and ``tl_logitlens_extra.pt`` (the ``_mid`` translators) are
        ours. Each file is written atomically.

        The folder is the lens's own (:class:`~tl_logitlens.files.OwnedFolder`): it is created
        if missing, and a folder holding any file tl_logitlens did not write there (a Hugging
        Face model, anything else) is refused before anything is written, unless
        ``overwrite=True`` (then the lens's files replace files of the same names, and no other
        file is touched). Saving again into the lens's own folder replaces the lens.

        Example::

            >>> import tempfile, tl_logitlens as tll
            >>> model = tll.demo_model()
            >>> folder = tempfile.mkdtemp()
            >>> tll.TunedLens(model).save(folder)
            >>> sorted(p.name for p in __import__("pathlib").Path(folder).iterdir())
            ['.tl_logitlens_files.json', 'config.json', 'params.pt', 'tl_logitlens.json', 'tl_logitlens_extra.pt']
        """
        if self.stream_change is not None:
            raise ModelStateError(
                f"cannot save this TunedLens in the tuned-lens format: it was built on a model whose "
                f"residual stream differs from Hugging Face hidden states because {self.stream_change}, "
                "so tuned-lens would apply it to a different stream. Build the lens on a model loaded "
                "without that processing (a bridge without enable_compatibility_mode(), or "
                "HookedTransformer.from_pretrained_no_processing)."
            )
        folder = OwnedFolder(directory, overwrite=overwrite, what="TunedLens.save")
        params: Dict[str, torch.Tensor] = {}
        extra: Dict[str, torch.Tensor] = {}
        for label, layer in self.translators.items():
            weight = layer.weight.detach().float().cpu().clone()
            bias = layer.bias.detach().float().cpu().clone()
            if label.endswith("_pre"):
                i = label[: -len("_pre")]
                params[f"{i}.weight"], params[f"{i}.bias"] = weight, bias
            else:
                extra[f"{label}.weight"], extra[f"{label}.bias"] = weight, bias
        config = {
            "base_model_name_or_path": self.model_name,
            "d_model": self.d_model,
            "num_hidden_layers": self.n_layers,
            "bias": True,
            "base_model_revision": None,
            "unembed_hash": self.unembed_hash,
            "lens_type": _LENS_TYPE,
        }
        ours = {
            "format": _EXTRA_FORMAT,
            "incl_mid": self.incl_mid,
            "labels": list(self.labels),
            "name": self.name,
            "unembed_sample": list(self.unembed_sample),
        }
        folder.write(_PARAMS, lambda tmp: torch.save(params, tmp))
        folder.write(_EXTRA_PARAMS, lambda tmp: torch.save(extra, tmp))
        folder.write_json(_EXTRA_JSON, ours, indent=2)
        folder.write_json(_CONFIG, config, indent=2)

    @classmethod
    def load(cls, directory: Union[str, Path], model: Any) -> TunedLens:
        """Read a lens saved by :meth:`save` or by tuned-lens 0.2.0, for ``model``.

        Checks, before reading any weights into the lens: ``config.json`` exists and is a
        ``linear_tuned_lens``; its ``d_model`` and ``num_hidden_layers`` match the model's
        (the error names both); the model's residual stream is the Hugging Face one (see
        :func:`stream_change`; otherwise refused with how to load the model instead). Then
        ``params.pt`` is read with ``weights_only=True``; a missing, truncated or corrupted
        file, a missing key or a wrong shape is refused naming the file. An unembedding that
        differs from the model's is reported with a ``UserWarning``: our files record
        :func:`~tl_logitlens.model_access.unembed_sample`, tuned-lens's its ``unembed_hash``,
        both compared by :func:`~tl_logitlens.model_access.unembed_matches`, so the same
        model in another dtype or on another device does not warn. The arguments are
        ``(folder, model)``; swapped, they are refused saying so.

        Example::

            >>> import tempfile, torch, tl_logitlens as tll
            >>> model = tll.demo_model()
            >>> lens = tll.TunedLens(model)
            >>> with torch.no_grad():
            ...     _ = lens.translators["1_pre"].bias.fill_(0.5)
            >>> folder = tempfile.mkdtemp()
            >>> lens.save(folder)
            >>> float(tll.TunedLens.load(folder, model).translators["1_pre"].bias.detach()[0])
            0.5
        """
        directory = _load_arguments(directory, model)
        config_path = directory / _CONFIG
        config, d_model, n_layers, has_bias = _read_config(config_path, model)
        _refuse_changed_stream(model, f"load the tuned lens {directory}")
        incl_mid, sample = _read_extras(directory / _EXTRA_JSON)
        lens = cls(model, incl_mid=incl_mid)
        state = _translator_state(directory, lens.labels, n_layers, d_model, has_bias, incl_mid)
        with torch.no_grad():
            for label, layer in lens.translators.items():
                layer.weight.copy_(state[f"{label}.weight"].float())
                layer.bias.copy_(state[f"{label}.bias"].float())
        recorded = sample if sample is not None else config.get("unembed_hash")
        if recorded and not unembed_matches(model, recorded):
            kind = "unembed_sample (tl_logitlens.json)" if sample is not None else "unembed_hash (config.json)"
            warnings.warn(
                f"{directory}: the lens's {kind} differs from this model's unembedding: the lens was trained "
                "with a different unembedding (another model, or a processed W_U such as a folded or centred "
                "one); its readings may be meaningless",
                UserWarning,
                stacklevel=2,
            )
        return lens


def _load_arguments(directory: Any, model: Any) -> Path:
    """``TunedLens.load``'s folder as a ``Path``, its arguments checked (and named when swapped)."""
    paths = (str, os.PathLike)
    if isinstance(model, paths) and not isinstance(directory, paths):
        raise LensInputError(
            f"TunedLens.load takes the folder first, then the model: TunedLens.load({str(model)!r}, model); "
            f"got a {type(directory).__name__} and then a path"
        )
    if not isinstance(directory, paths):
        raise LensInputError(
            f"TunedLens.load(folder, model): folder must be a path (a str or pathlib.Path), got "
            f"{type(directory).__name__}"
        )
    if not (hasattr(model, "cfg") and hasattr(model, "W_U")):
        raise LensInputError(
            "TunedLens.load(folder, model): model must be the HookedTransformer or TransformerBridge to read "
            f"the lens with, got {type(model).__name__}"
        )
    return Path(directory).expanduser()


def _read_config(config_path: Path, model: Any) -> Tuple[Dict[str, Any], int, int, bool]:
    """``(config, d_model, n_layers, has_bias)`` of a tuned-lens folder, checked against ``model``'s sizes."""
    if not config_path.is_file():
        raise LensInputError(
            f"{config_path}: not found; a tuned lens folder holds config.json and params.pt "
            "(as TunedLens.save and tuned-lens write them)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError(f"a JSON {type(config).__name__}, not an object")
        lens_type = config.get("lens_type", _LENS_TYPE)
        d_model, n_layers = int(config["d_model"]), int(config["num_hidden_layers"])
        has_bias = bool(config.get("bias", True))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise LensInputError(f"{config_path}: not a tuned-lens config ({type(err).__name__}: {err})") from None
    if lens_type != _LENS_TYPE:
        raise LensInputError(f"{config_path}: lens_type {lens_type!r} is not supported (only {_LENS_TYPE!r})")
    facts = describe(model)
    if d_model != facts.d_model:
        raise LensInputError(f"{config_path}: the lens has d_model={d_model} but the model has d_model={facts.d_model}")
    if n_layers != facts.n_layers:
        raise LensInputError(
            f"{config_path}: the lens has num_hidden_layers={n_layers} but the model has n_layers={facts.n_layers}"
        )
    return config, d_model, n_layers, has_bias


def _read_extras(path: Path) -> Tuple[bool, Optional[List[float]]]:
    """``(whether the lens has _mid translators, its unembed_sample or None)``, from our ``tl_logitlens.json``
    (absent: a tuned-lens folder)."""
    if not path.is_file():
        return False, None
    try:
        ours = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(ours, dict) or ours.get("format") != _EXTRA_FORMAT:
            got = ours.get("format") if isinstance(ours, dict) else None
            raise ValueError(f"format {got!r}, expected {_EXTRA_FORMAT!r}")
    except (UnicodeDecodeError, ValueError) as err:
        raise LensInputError(f"{path}: not a tl_logitlens lens description ({err})") from None
    sample = ours.get("unembed_sample")  # absent in files from before it was recorded
    valid = isinstance(sample, list) and all(isinstance(v, (int, float)) for v in sample)
    return bool(ours.get("incl_mid", False)), sample if valid else None


def _translator_state(
    directory: Path, labels: List[str], n_layers: int, d_model: int, has_bias: bool, incl_mid: bool
) -> Dict[str, torch.Tensor]:
    """``{"<label>.weight": [d, d], "<label>.bias": [d]}`` for every translator, read and checked from the files."""
    params = _read_state(directory / _PARAMS)
    wanted: Dict[str, tuple] = {}
    for i in range(n_layers):
        wanted[f"{i}.weight"] = (d_model, d_model)
        if has_bias:
            wanted[f"{i}.bias"] = (d_model,)
    _check_state(directory / _PARAMS, params, wanted)
    state = {}
    for i in range(n_layers):
        state[f"{i}_pre.weight"] = params[f"{i}.weight"]
        state[f"{i}_pre.bias"] = params[f"{i}.bias"] if has_bias else torch.zeros(d_model)
    if incl_mid:
        extra = _read_state(directory / _EXTRA_PARAMS)
        mids = [label for label in labels if label.endswith("_mid")]
        shapes = {f"{label}.weight": (d_model, d_model) for label in mids}
        shapes.update({f"{label}.bias": (d_model,) for label in mids})
        _check_state(directory / _EXTRA_PARAMS, extra, shapes)
        state.update({k: extra[k] for k in shapes})
    return state


def _read_state(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise LensInputError(f"{path}: not found; the lens folder is incomplete")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a damaged file: name the file, not the internals
        raise LensInputError(
            f"{path}: cannot be read as a tensor file (truncated or corrupted? {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LensInputError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    return state


def _check_state(path: Path, state: Dict[str, torch.Tensor], wanted: Dict[str, tuple]) -> None:
    missing = [k for k in wanted if k not in state]
    if missing:
        raise LensInputError(f"{path}: missing entries {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    for key, shape in wanted.items():
        if tuple(state[key].shape) != shape:
            raise LensInputError(f"{path}: {key!r} has shape {tuple(state[key].shape)}, expected {shape}")
        if not bool(torch.isfinite(state[key]).all()):
            raise LensInputError(f"{path}: {key!r} holds NaN or inf values")
