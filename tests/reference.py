"""Independent reference computations for the exactness tests.

Nothing here calls tl_logitlens. The lens reference runs the model's own ``ln_final``
module on each cached stream (the model's code, not ours), or for the cached-scale mode
uses the scale the forward pass recorded in ``ln_final.hook_scale`` with the norm's own
parameters; logits are then materialised in full and reduced with plain torch.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch


def norm_affine(model: Any) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(weight, bias) of ``ln_final`` read straight off the module (HookedTransformer or bridge)."""
    ln = getattr(model, "ln_final", None)
    if ln is None:
        return None, None
    inner = getattr(ln, "original_component", None) or ln
    weight = getattr(inner, "weight", getattr(inner, "w", None))
    bias = getattr(inner, "bias", getattr(inner, "b", None))
    return weight, bias


def accumulated(model: Any, cache: Any, incl_mid: bool = False) -> Tuple[List[str], torch.Tensor]:
    n = model.cfg.n_layers
    labels, xs = [], []
    for layer in range(n):
        labels.append(f"{layer}_pre")
        xs.append(cache[f"blocks.{layer}.hook_resid_pre"])
        if incl_mid:
            labels.append(f"{layer}_mid")
            xs.append(cache[f"blocks.{layer}.hook_resid_mid"])
    labels.append("final_post")
    xs.append(cache[f"blocks.{n - 1}.hook_resid_post"])
    device = model.W_U.device  # a model split over devices: its layers' streams, gathered where W_U is
    return labels, torch.stack([x.to(device) for x in xs])


def has_norm(model: Any) -> bool:
    return getattr(model.cfg, "normalization_type", None) is not None


def normalise(model: Any, stack: torch.Tensor, cache: Any, mode: str) -> torch.Tensor:
    """Apply the final norm to ``stack [layer, batch, pos, d]`` the reference way."""
    if mode == "none" or not has_norm(model):
        return stack
    if mode == "recompute":
        with torch.no_grad():
            return torch.stack([model.ln_final(x) for x in stack])
    # cached: the forward pass's own scale at each position, the norm's own parameters
    scale = cache["ln_final.hook_scale"]
    weight, bias = norm_affine(model)
    x = stack
    if str(model.cfg.normalization_type).startswith("LN"):
        x = x - x.mean(-1, keepdim=True)
    x = x / scale
    if weight is not None:
        x = x * weight
    if bias is not None:
        x = x + bias
    return x


def lens_reference(
    model: Any, tokens: torch.Tensor, *, norm: str = "recompute", unembed: str = "W_U", incl_mid: bool = False
) -> Dict[str, torch.Tensor]:
    """Full-logit lens statistics ``[layer, batch, pos, ...]`` computed directly."""
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        labels, stack = accumulated(model, cache, incl_mid)
        x = normalise(model, stack, cache, norm)
        if unembed == "W_U":
            out = x @ model.W_U + model.b_U
            cap = float(getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0)
            if cap > 0:
                out = cap * torch.tanh(out / cap)
        else:
            out = x @ model.W_E.T
        logp = torch.log_softmax(out.double(), -1)
        p = logp.exp()
        final = logp[-1]
        nxt = tokens[:, 1:]
        loss = -logp[:, :, :-1].gather(-1, nxt.unsqueeze(0).unsqueeze(-1).expand(logp.shape[0], -1, -1, 1))[..., 0]
        target_logits = out[:, :, :-1].gather(-1, nxt.unsqueeze(0).unsqueeze(-1).expand(out.shape[0], -1, -1, 1))
        ranks = (out[:, :, :-1] > target_logits).sum(-1)
    return {
        "labels": labels,
        "logits": out,
        "model_logits": logits,
        "entropy": -(p * logp).sum(-1),
        "kl": (final.exp() * (final - logp)).sum(-1),
        "loss": loss,
        "next_ranks": ranks,
        "cache": cache,
    }


def dla_reference(model: Any, cache: Any, answers: torch.Tensor, wrong: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-component logit-difference contributions at the last position, by the textbook formula."""
    n = model.cfg.n_layers
    u = (model.W_U[:, answers] - model.W_U[:, wrong]).T  # [batch, d]
    weight, bias = norm_affine(model)
    scale = cache["ln_final.hook_scale"][:, -1] if has_norm(model) else torch.ones(answers.shape[0], 1)
    ln = str(model.cfg.normalization_type).startswith("LN")

    def contrib(piece: torch.Tensor) -> torch.Tensor:
        x = piece[:, -1]
        if ln:
            x = x - x.mean(-1, keepdim=True)
        x = x / scale
        if weight is not None:
            x = x * weight
        return (x * u).sum(-1)

    names = ["hook_embed"] + (["hook_pos_embed"] if "hook_pos_embed" in cache.cache_dict else [])
    for layer in range(n):
        names.append(f"blocks.{layer}.hook_attn_out")
        if f"blocks.{layer}.hook_mlp_out" in cache.cache_dict:
            names.append(f"blocks.{layer}.hook_mlp_out")
    values = torch.stack([contrib(cache[name]) for name in names])
    constant = model.b_U[answers] - model.b_U[wrong]
    if bias is not None and has_norm(model):
        constant = constant + (u * bias).sum(-1)
    return {"names": names, "values": values, "constant": constant}


def _w_o(model: Any, layer: int) -> torch.Tensor:
    """``W_O [n_heads, d_head, d_model]`` of one layer, read off the module."""
    W_O = model.blocks[layer].attn.W_O.detach()
    if W_O.ndim == 2:  # some bridges keep [n_heads * d_head, d_model]
        W_O = W_O.reshape(model.cfg.n_heads, -1, W_O.shape[-1])
    return W_O


def head_pieces(model: Any, cache: Any, pos: int = -1) -> Dict[str, torch.Tensor]:
    """Every head's write at one position, ``z[head] @ W_O[head]``: ``{"LxHy": [batch, d_model]}``.

    Straight from ``attn.hook_z`` and the weights, one head at a time with plain matrix
    products (no einsum over heads), plus each layer's ``b_O`` as ``{layer}_attn_bias``.
    """
    out: Dict[str, torch.Tensor] = {}
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][:, pos]  # [batch, n_heads, d_head]
        W_O = _w_o(model, layer)
        for head in range(model.cfg.n_heads):
            out[f"L{layer}H{head}"] = z[:, head, :] @ W_O[head]
        b_O = getattr(model.blocks[layer].attn, "b_O", None)
        if b_O is not None:
            out[f"{layer}_attn_bias"] = b_O.detach().expand(z.shape[0], -1)
    return out


def neuron_pieces(model: Any, cache: Any, layer: int, pos: int = -1) -> torch.Tensor:
    """Every neuron's write at one position, ``post[n] * W_out[n]``: ``[d_mlp, batch, d_model]``."""
    post = cache[f"blocks.{layer}.mlp.hook_post"][:, pos]  # [batch, d_mlp]
    W_out = model.blocks[layer].mlp.W_out.detach()  # [d_mlp, d_model]
    return torch.stack([post[:, n : n + 1] * W_out[n] for n in range(W_out.shape[0])])


def project_cached(
    model: Any, cache: Any, pieces: torch.Tensor, answers: torch.Tensor, wrong: torch.Tensor, pos: int = -1
) -> torch.Tensor:
    """Pieces ``[n, batch, d_model]`` at position ``pos`` read along ``W_U[answer] - W_U[wrong]``
    through the final norm with the forward pass's own scale there (no bias): ``[n, batch]``."""
    u = (model.W_U[:, answers] - model.W_U[:, wrong]).T
    weight, _ = norm_affine(model)
    x = pieces
    if has_norm(model):
        if str(model.cfg.normalization_type).startswith("LN"):
            x = x - x.mean(-1, keepdim=True)
        x = x / cache["ln_final.hook_scale"][:, pos]
        if weight is not None:
            x = x * weight
    return (x * u).sum(-1)


def source_pieces(model: Any, cache: Any, pos: int = -1) -> Dict[str, torch.Tensor]:
    """Every head's write at one destination split over source positions, in float64:
    ``{"LxHy": [src, batch, d_model]}`` with piece ``pattern[dest, src] * (v[src] @ W_O[h])``.

    Straight from ``attn.hook_pattern``, ``attn.hook_v`` and ``W_O``, one head and one source
    at a time; head ``h`` of a grouped-query layer reads value head ``h // (n_heads // n_kv)``.
    """
    out: Dict[str, torch.Tensor] = {}
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].double()  # [batch, head, dest, src]
        v = cache[f"blocks.{layer}.attn.hook_v"].double()  # [batch, src, n_kv, d_head]
        W_O = _w_o(model, layer).double()
        n_heads, n_kv = model.cfg.n_heads, v.shape[2]
        for head in range(n_heads):
            kv = head // (n_heads // n_kv)
            rows = []
            for src in range(v.shape[1]):
                rows.append(pattern[:, head, pos, src : src + 1] * (v[:, src, kv, :] @ W_O[head]))
            out[f"L{layer}H{head}"] = torch.stack(rows)
    return out


def final_norm64(model: Any, x: torch.Tensor) -> torch.Tensor:
    """The final norm on ``x [..., d]`` in float64 with each vector's own statistics and the
    norm module's own weight, bias and epsilon."""
    kind = getattr(model.cfg, "normalization_type", None)
    if kind is None:
        return x.double()
    ln = model.ln_final
    inner = getattr(ln, "original_component", None) or ln
    eps = next(
        (
            float(getattr(inner, n))
            for n in ("eps", "variance_epsilon")
            if isinstance(getattr(inner, n, None), (int, float))
        ),
        float(model.cfg.eps),
    )
    x = x.double()
    if str(kind).startswith("LN"):
        x = x - x.mean(-1, keepdim=True)
    x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    weight, bias = norm_affine(model)
    if weight is not None:
        x = x * weight.detach().double().to(x.device)
    if bias is not None:
        x = x + bias.detach().double().to(x.device)
    return x


def lens_logits64(model: Any, tokens: torch.Tensor, round_to: Optional[torch.dtype] = None) -> torch.Tensor:
    """Full logit-lens logits ``[layer, batch, pos, d_vocab]`` in float64 from the stored streams
    (``0_pre .. final_post``), read through the final norm (own statistics) and ``W_U``, ``b_U``.
    ``round_to``: the normalised vectors rounded to that dtype first (what half-precision
    products read)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        _, stack = accumulated(model, cache)
        normed = final_norm64(model, stack)
        if round_to is not None:
            normed = normed.to(round_to).double()
        out = normed @ model.W_U.detach().double()
        b_U = getattr(model, "b_U", None)
        return out + (0 if b_U is None else b_U.detach().double())


def group_stats(logits: torch.Tensor, groups: List[List[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each token group's summed probability and log-sum-exp logit from full logits ``[..., d_vocab]``:
    ``([..., group], [..., group])``, in float64, one group at a time."""
    logp = torch.log_softmax(logits.double(), -1)
    probs = torch.stack([logp[..., ids].exp().sum(-1) for ids in groups], -1)
    lse = torch.stack([torch.logsumexp(logits.double()[..., ids], -1) for ids in groups], -1)
    return probs, lse
