"""A model's norms read as plain parameters, each checked against the module it came from.

The final norm (``ln_final``) and a block's post-norms (``ln1_post``, ``ln2_post``: Gemma 2/3, OLMo 2,
GLM-4, EXAONE 4) are read the same way: kind (LayerNorm or RMSNorm), weight, bias and epsilon, as a
:class:`~tl_logitlens.kernel.FinalNorm`, and then run on a probe vector beside the model's own module.
Families store the gain two ways: as the gain itself (Llama, GPT-2), or as an offset from 1 that the
module applies as ``1 + weight`` (Gemma's RMSNorm, Nemotron's ``LayerNorm1P``, VaultGemma). The
convention the bridge declares is tried first, then the other; the first that reproduces the module
on the probe is kept, and a norm that neither reproduces is refused: the package never guesses.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from ..errors import UnsupportedModelError
from ..kernel import FinalNorm, compute_dtype

# Relative error allowed between our parametric norm and the model's own module in float32 and
# float64; in half precision the module's output is rounded to its dtype, so the bound is
# norm_check_rtol(dtype) = max(1e-4, 4 * eps(dtype)) (eps: torch.finfo(dtype).eps, twice the unit
# roundoff: 0.031 for bfloat16, 0.0039 for float16).
_NORM_CHECK_RTOL = 1e-4


def norm_check_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance of the norm probe for a norm computed in ``dtype``."""
    return max(_NORM_CHECK_RTOL, 4 * torch.finfo(dtype).eps)


def inner_module(norm: torch.nn.Module) -> torch.nn.Module:
    """The module that holds a norm's parameters: HF's module inside a bridge component, or the module itself."""
    inner = getattr(norm, "original_component", None)
    if not isinstance(inner, torch.nn.Module):
        inner = getattr(norm, "_original_component", None)
    return inner if isinstance(inner, torch.nn.Module) else norm


def _module_params(norm: torch.nn.Module) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[float]]:
    """Weight, bias and eps of a TransformerLens norm or of the HF module inside a bridge's."""
    module = inner_module(norm)
    weight = getattr(module, "weight", None)
    if weight is None:
        weight = getattr(module, "w", None)
    bias = getattr(module, "bias", None)
    if bias is None:
        bias = getattr(module, "b", None)
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = getattr(module, "variance_epsilon", None)
    weight = weight.detach() if isinstance(weight, torch.Tensor) else None
    bias = bias.detach() if isinstance(bias, torch.Tensor) else None
    return weight, bias, (float(eps) if isinstance(eps, (int, float)) else None)


def _kind(norm: torch.nn.Module, declared: Optional[str]) -> str:
    """``"RMS"`` or ``"LN"``: what the bridge says, else the module's class name, else ``declared`` (the config)."""
    uses_rms = getattr(norm, "uses_rms_norm", None)
    if isinstance(uses_rms, bool) and type(norm).__name__ != "GeneralizedComponent":
        return "RMS" if uses_rms else "LN"
    name = type(inner_module(norm)).__name__
    if "RMS" in name:
        return "RMS"
    if "LayerNorm" in name:
        return "LN"
    if declared is not None and str(declared).startswith(("RMS", "LN")):
        return "RMS" if str(declared).startswith("RMS") else "LN"
    raise UnsupportedModelError(
        f"unknown norm {name} (normalization_type={declared!r}); only LayerNorm and RMSNorm variants are read exactly."
    )


def _declares_offset(norm: torch.nn.Module, model: Any) -> bool:
    """Whether the bridge (or the config) says this norm multiplies by ``1 + weight``."""
    declared = getattr(norm, "uses_weight_offset", None)
    if isinstance(declared, bool):
        return declared
    return bool(getattr(model.cfg, "rmsnorm_uses_offset", False)) and "RMS" in type(inner_module(norm)).__name__


def read_norm(norm: torch.nn.Module, model: Any, what: str, declared_kind: Optional[str] = None) -> FinalNorm:
    """``norm`` (a bridge component or a TransformerLens norm) as a :class:`FinalNorm` that reproduces it.

    ``what`` names the norm in errors (``"the final norm"``, ``"blocks.3.ln1_post"``);
    ``declared_kind`` is the config's ``normalization_type``, used when neither the bridge nor
    the class name tells the kind. Raises :class:`UnsupportedModelError` when no reading
    reproduces the module on a probe vector.
    """
    weight, bias, eps = _module_params(norm)
    kind = _kind(norm, declared_kind)
    eps = eps if eps is not None else float(getattr(model.cfg, "eps", 1e-5))
    gains = [weight]
    if weight is not None:
        # 1 + weight in the compute dtype: in bfloat16 the sum would round (Gemma's module adds in float32)
        offset = weight.to(compute_dtype(weight.dtype)) + 1.0
        gains = [offset, weight] if _declares_offset(norm, model) else [weight, offset]
    errors = []
    for gain in gains:
        candidate = FinalNorm(kind, gain, bias, eps)
        err, size, dtype = _probe_gap(candidate, norm, model)
        if err <= norm_check_rtol(dtype) * max(1.0, size):
            return candidate
        errors.append(err)
    raise UnsupportedModelError(
        f"{what} ({type(inner_module(norm)).__name__}) does not behave as a {kind} norm with its own weight "
        f"(or 1 + weight), bias and eps (max difference {min(errors):.3g} on a probe vector, more than the "
        f"{norm_check_rtol(dtype):.2g} relative rounding of {dtype} explains); this package will not guess its formula."
    )


def _probe_gap(candidate: FinalNorm, norm: torch.nn.Module, model: Any) -> Tuple[float, float, torch.dtype]:
    """``(max |module(probe) - candidate(probe)|, max |module(probe)|, the module's output dtype)`` on a probe.

    This catches norms with a twist (an offset gain, a different eps) that would otherwise
    give a quietly wrong lens. The probe lives on the norm's own parameters' device and
    dtype (the model's if it has none, e.g. ``LNPre``), and the check runs in every
    precision: a half-precision module's output is rounded to its dtype, so the tolerance
    is :func:`norm_check_rtol` of that dtype.
    """
    params = list(norm.parameters()) or [model.W_U]
    param = params[0]
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(1, 3, int(model.cfg.d_model), generator=gen).to(param.device, param.dtype) * 3 + 0.5
    with torch.no_grad():
        out = norm(probe)
        theirs = out.float()
        ours = candidate.to(torch.float32, probe.device).apply(probe.float(), "recompute")
    err = (theirs - ours).abs().max().item()
    return err, theirs.abs().max().item(), out.dtype


def final_norm(model: Any) -> FinalNorm:
    """The model's ``ln_final`` as a checked :class:`FinalNorm` (kind ``None`` for a model without one)."""
    cfg = model.cfg
    ln_final = getattr(model, "ln_final", None)
    norm_type = getattr(cfg, "normalization_type", None)
    if not isinstance(ln_final, torch.nn.Module) or norm_type is None:
        if norm_type is not None:
            raise UnsupportedModelError(
                f"the config declares normalization_type={norm_type!r} but the model exposes no "
                "`ln_final`, so the final norm cannot be applied exactly."
            )
        return FinalNorm(None, None, None, 0.0)
    declared = "RMS" if getattr(cfg, "final_rms", False) else norm_type
    return read_norm(ln_final, model, "the final norm", declared)
