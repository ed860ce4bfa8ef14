"""The Jacobian lens (Gurnee et al. 2026): one fitted linear map per stack entry.

``J_l`` is the average over a corpus of the derivative of the final stream (``final_post``,
before the final norm) with respect to the stream at an entry: for every valid source
position ``t`` the sum over target positions ``t' >= t`` of ``d h_final[t'] / d h_entry[t]``,
averaged over the source positions of a prompt, then over prompts (TransformerLens 4.3's
``JacobianLens`` estimator, :func:`~tl_logitlens.lenses.training.jacobian.fit_jacobian_lens`).
Reading an entry through the lens is the model's own final norm and unembedding of ``J_l h``;
``final_post`` is read untouched (its ``J`` is the identity), so the plain logit lens is the
special case ``J_l = I``.

Labels: TransformerLens's layer ``l`` (the output of block ``l``, ``blocks.l.hook_out``) is our
entry ``{l+1}_pre``. We also fit entries TransformerLens does not: ``0_pre`` (the embeddings'
output) and, with ``incl_mid``, the ``L_mid`` entries.

Files: :meth:`JacobianLens.save` writes TransformerLens's artifact (``{"J": {layer: float16
[d, d]}, "n_prompts", "source_layers", "d_model", "metadata"}``) so that
``transformer_lens.tools.analysis.JacobianLens.load`` reads it; our extra entries and the
unembedding's fingerprint sit under a ``"tl_logitlens"`` key that loader ignores.
:meth:`JacobianLens.load` reads those artifacts and TransformerLens's fit checkpoints.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from ..errors import LensInputError, ModelStateError
from ..files import write_owned_file
from ..model_access import describe, stream_change, unembed_matches, unembed_sample, view
from ..stacks import stack_labels
from .base import Lens, ModelSignature

#: The key of our own part of an artifact (TransformerLens's loader ignores it).
EXTRA_KEY = "tl_logitlens"
_FORMAT = "tl_logitlens.jacobian_lens/1"
#: The estimator TransformerLens records; ours is the same.
ESTIMATOR = "jacobian_lens"


def tl_layer(label: str, n_layers: int) -> Optional[int]:
    """TransformerLens's layer index for our entry ``label`` (``"3_pre"`` -> 2), ``None`` if it has none.

    Example::

        >>> tl_layer("3_pre", 4), tl_layer("0_pre", 4), tl_layer("2_mid", 4)
        (2, None, None)
    """
    if label.endswith("_pre") and label[:-4].isdigit() and 1 <= int(label[:-4]) <= n_layers - 1:
        return int(label[:-4]) - 1
    return None


def _is_jacobian_file(payload: Any) -> bool:
    return isinstance(payload, dict) and ("J" in payload or "jacobian_sum" in payload)


class JacobianLens(Lens):
    """A fitted Jacobian lens: ``transform(h, label) = h @ J[label].T`` (float32), identity at ``final_post``.

    Attributes:
        matrices: ``{label: [d_model, d_model]}`` float32 on the CPU (rows: the final stream's
            coordinates, columns: the entry's).
        n_prompts: the prompts averaged into the fit.
        d_model, n_layers, model_name: the model it was fitted on (or loaded for).
        metadata: provenance (TransformerLens's keys where they apply).

    Build one with :func:`~tl_logitlens.fit_jacobian_lens` or :meth:`load`; it works wherever
    ``lens=`` does (:func:`~tl_logitlens.logit_lens`, :func:`~tl_logitlens.compare_lenses`, ...).

    Example::

        >>> import torch, tl_logitlens as tll
        >>> model = tll.demo_model()
        >>> eye = {label: torch.eye(64) for label in ["0_pre", "1_pre"]}
        >>> lens = tll.JacobianLens(model, eye, n_prompts=1)
        >>> h = torch.randn(3, 64)
        >>> bool(torch.equal(lens.transform(h, "1_pre"), h)), lens.built_for().labels
        (True, ('0_pre', '1_pre', 'final_post'))
    """

    name = "jacobian"
    identity_at_final = True  # final_post's J is the identity

    def __init__(
        self,
        model: Any,
        matrices: Dict[str, torch.Tensor],
        *,
        n_prompts: int,
        metadata: Optional[Dict[str, Any]] = None,
        unembed: Optional[List[float]] = None,
    ) -> None:
        facts = describe(model)
        self.d_model, self.n_layers, self.model_name = facts.d_model, facts.n_layers, facts.model_name
        known = stack_labels(self.n_layers, True)[:-1]
        if not matrices:
            raise LensInputError("a JacobianLens needs at least one matrix")
        for label, matrix in matrices.items():
            if label not in known:
                raise LensInputError(f"JacobianLens: {label!r} is not a stack entry below final_post; entries: {known}")
            if tuple(matrix.shape) != (self.d_model, self.d_model):
                raise LensInputError(
                    f"JacobianLens: the matrix for {label!r} has shape {tuple(matrix.shape)}, "
                    f"the model needs ({self.d_model}, {self.d_model})"
                )
        order = {label: i for i, label in enumerate(known)}
        self.matrices: Dict[str, torch.Tensor] = {
            label: matrices[label].detach().float().cpu() for label in sorted(matrices, key=order.__getitem__)
        }
        self.n_prompts = int(n_prompts)
        self.metadata: Dict[str, Any] = dict(metadata or {})
        self.unembed_sample = list(unembed) if unembed is not None else unembed_sample(model)
        self.stream_change = stream_change(model)
        self._on: Dict[Any, torch.Tensor] = {}

    @property
    def labels(self) -> List[str]:
        """The entries this lens has a matrix for (``final_post`` is read untouched besides)."""
        return list(self.matrices)

    def transform(self, h: torch.Tensor, label: str) -> torch.Tensor:
        """``h @ J[label].T`` in float32 on ``h``'s device; ``h`` itself (float32) at ``final_post``."""
        if label == "final_post":
            return h.float()
        matrix = self.matrices.get(label)
        if matrix is None:
            hint = " (fit with incl_mid=True for _mid entries)" if str(label).endswith("_mid") else ""
            raise LensInputError(
                f"this JacobianLens has no matrix for stack entry {label!r}{hint}; it has {self.labels}"
                " and reads final_post untransformed"
            )
        key = (label, h.device)
        if key not in self._on:
            self._on[key] = matrix.to(h.device)
        return h.float() @ self._on[key].T

    def built_for(self) -> ModelSignature:
        """The model this lens was fitted (or loaded) for: sizes, unembedding and the entries it reads."""
        return ModelSignature(
            self.n_layers, self.d_model, list(self.unembed_sample), (*self.labels, "final_post"), self.model_name
        )

    def __repr__(self) -> str:
        return (
            f"JacobianLens({len(self.matrices)} matrices, d_model={self.d_model}, n_layers={self.n_layers}, "
            f"n_prompts={self.n_prompts})"
        )

    def vectors(self, model: Any, tokens: Any, label: str) -> torch.Tensor:
        """The rows of ``W_U J[label]`` for ``tokens``: one residual direction per token, ``[n, d_model]``.

        Row ``t`` is ``J[label].T @ W_U[:, t]`` (float32, on the unembedding's device): the
        direction at entry ``label`` that the lens reads as token ``t`` (the vectors used for
        steering). ``tokens``: a token string or id, or a list of them. At ``final_post`` the
        rows are ``W_U``'s columns.

        Example::

            >>> import torch, tl_logitlens as tll
            >>> model = tll.demo_model()
            >>> lens = tll.JacobianLens(model, {"1_pre": 2 * torch.eye(64)}, n_prompts=1)
            >>> v = lens.vectors(model, ["cat", "sun"], "1_pre")
            >>> v.shape, bool(torch.allclose(v[0], 2 * model.W_U[:, model.to_single_token("cat")]))
            (torch.Size([2, 64]), True)
        """
        from ..inputs.tokens import token_list
        from .base import check_lens

        v = view(model)
        check_lens(self, v, [label])
        ids = token_list(v, tokens, "tokens")
        columns = v.W_U[:, ids].float()  # [d_model, n]
        if label == "final_post":
            return columns.T
        return (self.matrices[label].to(columns.device).T @ columns).T

    # -- files ------------------------------------------------------------------------------
    def save(self, path: Union[str, Path], *, overwrite: bool = False, dtype: torch.dtype = torch.float16) -> None:
        """Write the lens as TransformerLens's artifact file (``torch.save``), atomically.

        ``{"J": {layer: [d, d]}, "n_prompts", "source_layers", "d_model", "metadata"}`` holds
        the entries TransformerLens knows (``{l+1}_pre`` as its layer ``l``), in ``dtype``
        (float16 like TransformerLens and the published artifacts); ``"tl_logitlens"`` holds
        ours (``0_pre``, ``_mid``; float32) and the unembedding's fingerprint. An existing
        file not written by tl_logitlens is refused unless ``overwrite``.

        Example::

            >>> import tempfile, torch, tl_logitlens as tll
            >>> model = tll.demo_model()
            >>> lens = tll.JacobianLens(model, {"1_pre": torch.eye(64)}, n_prompts=3)
            >>> path = tempfile.mkdtemp() + "/lens.pt"
            >>> lens.save(path)
            >>> tll.JacobianLens.load(path, model).n_prompts
            3
        """
        if self.stream_change is not None:
            raise ModelStateError(
                "cannot save this JacobianLens in TransformerLens's format: it was fitted on a model whose "
                f"residual stream differs from Hugging Face hidden states because {self.stream_change}, so "
                "TransformerLens (which reads raw models) would apply it to a different stream. Fit on a model "
                "loaded without that processing (a bridge without enable_compatibility_mode())."
            )
        payload = self.payload(dtype)
        replace = overwrite or _written_by_us(Path(path).expanduser())
        write_owned_file(path, lambda tmp: torch.save(payload, tmp), overwrite=replace, what="JacobianLens.save")

    def payload(self, dtype: torch.dtype = torch.float16) -> Dict[str, Any]:
        """The artifact as a dict (what :meth:`save` writes)."""
        ours = {label: m for label, m in self.matrices.items() if tl_layer(label, self.n_layers) is None}
        theirs = {
            tl_layer(label, self.n_layers): m.to(dtype) for label, m in self.matrices.items() if label not in ours
        }
        metadata = {
            "model_name": self.model_name,
            "estimator": ESTIMATOR,
            "hook_convention": "blocks.{layer}.hook_out",
            "target_layer": self.n_layers - 1,
            "n_prompts": self.n_prompts,
            **{k: v for k, v in self.metadata.items() if isinstance(v, (str, int, float, bool, type(None)))},
        }
        return {
            "J": theirs,
            "n_prompts": self.n_prompts,
            "source_layers": sorted(theirs),
            "d_model": self.d_model,
            "metadata": metadata,
            EXTRA_KEY: {
                "format": _FORMAT,
                "J": dict(ours),
                "labels": self.labels,
                "n_layers": self.n_layers,
                "unembed_sample": list(self.unembed_sample),
            },
        }

    @classmethod
    def load(cls, path: Union[str, Path], model: Any) -> JacobianLens:
        """Read a Jacobian lens for ``model``: our artifact, TransformerLens's, or its fit checkpoint.

        Artifacts hold ``J`` (means); fit checkpoints (``{jacobian_sum, n_done, next_idx,
        source_layers, target_layer, skip_first}``, TransformerLens's and ours) hold sums, divided
        here by ``n_done``. Refused, naming both sides, before anything is built: a file that is
        neither; a ``d_model`` other than the model's; a layer outside the model's
        ``0 .. n_layers - 2``; a target layer other than the model's last block. A different
        unembedding (recorded by our files) or model name is warned about.

        Example::

            >>> import tempfile, torch, tl_logitlens as tll
            >>> lens = tll.JacobianLens(tll.demo_model(), {"1_pre": torch.eye(64)}, n_prompts=1)
            >>> path = tempfile.mkdtemp() + "/lens.pt"
            >>> lens.save(path)
            >>> tll.JacobianLens.load(path, tll.demo_model()).labels
            ['1_pre']
        """
        if not (hasattr(model, "cfg") and hasattr(model, "W_U")):
            raise LensInputError(
                f"JacobianLens.load(path, model): model must be the HookedTransformer or TransformerBridge to read "
                f"the lens with, got {type(model).__name__}"
            )
        path = Path(path).expanduser()
        payload = _read(path)
        facts = describe(model)
        sums = "J" not in payload
        table = payload["jacobian_sum"] if sums else payload["J"]
        count = int(payload.get("n_done", payload.get("n_prompts", 0)) if sums else payload.get("n_prompts", 0))
        if sums and count <= 0:
            raise LensInputError(f"{path}: a fit checkpoint with n_done={count}: nothing to divide by")
        ours = payload.get(EXTRA_KEY) if isinstance(payload.get(EXTRA_KEY), dict) else {}
        matrices = _matrices(path, table, ours, facts.d_model, facts.n_layers)
        _check_target(path, payload, facts.n_layers)
        if sums:
            matrices = {label: m.float() / count for label, m in matrices.items()}
        metadata = dict(payload.get("metadata") or {})
        recorded = ours.get("unembed_sample")
        if recorded is not None and not unembed_matches(model, recorded):
            warnings.warn(
                f"{path}: the lens was fitted with a different unembedding (another model, or a processed W_U); "
                "its readings may be meaningless",
                UserWarning,
                stacklevel=2,
            )
        name = metadata.get("model_name")
        if isinstance(name, str) and name and facts.model_name and name != facts.model_name:
            warnings.warn(f"{path}: the lens was fitted on {name!r}, the model is {facts.model_name!r}", stacklevel=2)
        return cls(model, matrices, n_prompts=count, metadata=metadata, unembed=recorded)


def _read(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise LensInputError(f"{path}: not found; a Jacobian lens is one .pt file (JacobianLens.save, TransformerLens)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a damaged file: name the file
        raise LensInputError(
            f"{path}: cannot be read as a tensor file (truncated or corrupted? {type(err).__name__})"
        ) from None
    if not _is_jacobian_file(payload):
        raise LensInputError(
            f"{path}: not a Jacobian lens: expected a 'J' key (artifact) or a 'jacobian_sum' key (fit checkpoint)"
        )
    return payload


def _matrices(path: Path, table: Any, ours: Dict[str, Any], d_model: int, n_layers: int) -> Dict[str, torch.Tensor]:
    """``{our label: matrix}`` from TransformerLens's layer-keyed table and our extra entries, checked."""
    if not isinstance(table, dict) or not table:
        raise LensInputError(f"{path}: holds no matrices")
    out: Dict[str, torch.Tensor] = {}
    for layer, matrix in table.items():
        layer = int(layer)
        if not 0 <= layer <= n_layers - 2:
            raise LensInputError(
                f"{path}: the lens has layer {layer}, outside this model's source layers 0..{n_layers - 2} "
                f"(n_layers={n_layers}): it was fitted on another model"
            )
        out[f"{layer + 1}_pre"] = matrix
    extra = ours.get("J") or {}
    out.update({str(k): v for k, v in extra.items()})
    for label, matrix in out.items():
        if not isinstance(matrix, torch.Tensor) or tuple(matrix.shape) != (d_model, d_model):
            shape = tuple(getattr(matrix, "shape", ()))
            raise LensInputError(
                f"{path}: the matrix for {label} has shape {shape}; this model has d_model={d_model}, "
                "so the lens was fitted on another model"
            )
        if not bool(torch.isfinite(matrix).all()):
            raise LensInputError(f"{path}: the matrix for {label} holds NaN or inf values")
    return out


def _check_target(path: Path, payload: Dict[str, Any], n_layers: int) -> None:
    meta = payload.get("metadata") if isinstance(payload.get("metadata"), dict) else {}
    target = payload.get("target_layer", meta.get("target_layer", n_layers - 1))
    if int(target) != n_layers - 1:
        raise LensInputError(
            f"{path}: the lens maps to layer {int(target)}, but a Jacobian lens here maps to the model's last block "
            f"({n_layers - 1}): it was fitted on another model or with a custom target"
        )


def _written_by_us(path: Path) -> bool:
    """Whether ``path`` is a Jacobian lens file this package wrote (saving again may replace it)."""
    if not path.is_file():
        return False
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # anything unreadable is not ours to replace
        return False
    return _is_jacobian_file(payload) and isinstance(payload.get(EXTRA_KEY), dict)
