"""Independent reference computations for the exactness tests.

Nothing here calls tl_logitlens. The lens reference runs the model's own ``ln_final``
module on each cached stream (the model's code, not ours), or for the cached-scale mode
uses the scale the forward pass recorded in ``ln_final.hook_scale`` with the norm's own
parameters; logits are then materialised in full and reduced with plain torch.
"""

from __future__ import annotations

import copy
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
        # The values the pattern mixes: after Gemma 4's v_norm where there is one; DeepSeek's latent
        # attention caches them head-major, [batch, head, src, d_head].
        normed = f"blocks.{layer}.attn.v_norm.hook_out"
        v = cache[normed if normed in cache.cache_dict else f"blocks.{layer}.attn.hook_v"].double()
        if v.shape[1] != pattern.shape[-1]:
            v = v.transpose(1, 2)  # [batch, src, n_kv, d_head]
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


# -- any model family (tests/zoo.py): the Hugging Face model's own modules, read as linear maps ---------
# Norms are read through their own modules, never through their parameters: a norm N is linear at a
# fixed scale, N(p) = centre(p) * (N(x) - N(0)) / centre(x) for the vector x it normalised in the
# forward pass (N(0) is its bias; centre subtracts the mean for a LayerNorm and is the identity for an
# RMSNorm). Which of the two a module is, is found by its behaviour (a LayerNorm ignores a shift), and
# its gain convention (weight, or 1 + weight) never has to be known.


def _norm_is_layernorm(norm: Any, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return bool(torch.allclose(norm(x), norm(x + 0.5), atol=1e-3, rtol=1e-3))


def norm_linear_map(norm: Any, x: torch.Tensor):
    """``(L, bias)``: the norm module at the fixed scale of ``x [batch, d]``, as ``L(p [n, batch, d]) -> [n, batch, d]``
    in float64, and its bias ``[batch, d]`` (``N(0)``)."""
    norm = copy.deepcopy(norm).to(torch.float64)  # the module's own code and weights, in float64
    x = x.double()
    with torch.no_grad():
        out = norm(x).double()
        bias = norm(torch.zeros_like(x)).double()
    layernorm = _norm_is_layernorm(norm, x)

    def centre(p: torch.Tensor) -> torch.Tensor:
        return p - p.mean(-1, keepdim=True) if layernorm else p

    # (N(x) - N(0)) / centre(x) is gain / scale(x) elementwise, but undefined where an element of x is 0 (a
    # bfloat16 stream has exact zeros). So the gain is read on a probe y without zeros, and only the ratio
    # of the two scales is read off x, at its largest element with a gain: N at x's scale is N at y's, times it.
    y = torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    with torch.no_grad():
        per_y = (norm(y) - norm(torch.zeros_like(y))).double() / centre(y)
    at = (centre(x) * per_y).abs().argmax(-1, keepdim=True)  # [batch, 1]: large in x, gain not 0
    per_x = (out - bias).gather(-1, at) / centre(x).gather(-1, at)
    ratio = per_x / per_y[at] * per_y
    return (lambda p: centre(p.double()) * ratio), bias


def _hf_norm(bridge_norm: Any) -> Any:
    return getattr(bridge_norm, "original_component", None) or bridge_norm


def logit_scale(model: Any) -> float:
    """The linear factor a Hugging Face model applies to its logits: Cohere's ``logit_scale`` (as the model holds
    it), Granite's ``1 / logits_scaling``; 1 for the rest."""
    hf = model.original_model
    scale = float(getattr(hf, "logit_scale", 1.0) or 1.0)
    return scale / float(getattr(hf.config, "logits_scaling", 1.0) or 1.0)


def _sublayer_map(model: Any, cache: Any, layer: int, kind: str, pos: int):
    """How block ``layer``'s ``kind`` output reaches the stream, as a linear map on pieces ``[n, batch, d]``:
    its post-norm (the bridge's ``ln1_post``/``ln2_post``) at the forward pass's scale, times Granite's
    ``residual_multiplier`` (from the HF config)."""
    multiplier = float(getattr(model.original_model.config, "residual_multiplier", 1.0) or 1.0)
    post = getattr(model.blocks[layer], "ln1_post" if kind == "attn" else "ln2_post", None)
    if post is None:
        return lambda p: p.double() * multiplier
    raw = cache[f"blocks.{layer}.{'ln1_post' if kind == 'attn' else 'ln2_post'}.hook_in"][:, pos]
    linear, _ = norm_linear_map(_hf_norm(post), raw)
    return lambda p: linear(p) * multiplier


def family_readout(model: Any, cache: Any, answers: torch.Tensor, wrong: torch.Tensor, pos: int = -1):
    """``(read, constant)``: a piece ``[n, batch, d]`` at ``pos`` read along ``lm_head[answer] - lm_head[wrong]``
    through the HF final norm at the forward pass's scale, times the logit scale, ``-> [n, batch]``; and what no
    piece writes ``[batch]`` (the norm's bias and ``lm_head``'s bias along the same direction)."""
    hf = model.original_model
    head = hf.get_output_embeddings()
    W = head.weight.detach().double()
    u = W[answers] - W[wrong]  # [batch, d]
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, pos]
    linear, bias = norm_linear_map(_hf_norm(model.ln_final), final)
    k = logit_scale(model)
    constant = (bias * u).sum(-1)
    if getattr(head, "bias", None) is not None:
        b = head.bias.detach().double()
        constant = constant + b[answers] - b[wrong]
    return (lambda p: k * (linear(p) * u).sum(-1)), k * constant


def family_pieces(model: Any, cache: Any, by: str, pos: int = -1) -> Dict[str, torch.Tensor]:
    """Every piece ``{label: [batch, d_model]}`` at ``pos`` in float64, each written as the HF block writes it.

    ``by="head"``: ``z[head] @ W_O[head]`` and the attention bias; ``by="neuron"``: ``post[n] * W_out[n]`` and
    the MLP bias (dense layers only). Each through its sublayer's post-norm and multiplier (``_sublayer_map``).
    """
    out: Dict[str, torch.Tensor] = {}
    for layer in range(model.cfg.n_layers):
        kind = "attn" if by == "head" else "mlp"
        if kind == "mlp" and is_expert_layer(model, layer):
            continue  # expert layers: expert_pieces
        if by == "head":
            z = cache[f"blocks.{layer}.attn.hook_z"][:, pos].double()
            z = z.reshape(z.shape[0], model.cfg.n_heads, -1)
            W_O = _w_o(model, layer).double()
            pieces = {f"L{layer}H{h}": z[:, h] @ W_O[h] for h in range(model.cfg.n_heads)}
            bias, name = getattr(model.blocks[layer].attn, "b_O", None), f"{layer}_attn_bias"
        else:
            post = cache[f"blocks.{layer}.mlp.hook_post"][:, pos].double()
            W_out = model.blocks[layer].mlp.W_out.detach().double()
            pieces = {f"L{layer}N{n}": post[:, n : n + 1] * W_out[n] for n in range(W_out.shape[0])}
            bias, name = getattr(model.blocks[layer].mlp, "b_out", None), f"{layer}_mlp_bias"
        batch = next(iter(pieces.values())).shape[0]
        if bias is not None:
            pieces[name] = bias.detach().double().expand(batch, -1)
        written = _sublayer_map(model, cache, layer, kind, pos)(torch.stack(list(pieces.values())))
        out.update(zip(pieces, written))
    return out


def is_expert_layer(model: Any, layer: int) -> bool:
    """Whether the bridge's ``blocks.{layer}.mlp`` is an expert block (not a dense layer of an expert model)."""
    mlp = model.blocks[layer].mlp
    return type(mlp).__name__ == "MoEBridge" and not getattr(mlp, "bound_dense", False)


def expert_pieces(model: Any, cache: Any, layer: int, pos: int = -1) -> Dict[str, torch.Tensor]:
    """Mixtral's and Qwen2-MoE's expert layer written by hand from the HF weights, in float64:
    ``{"L{l}E{e}N{n}": w_e * a_e[n] * down_e[:, n], "L{l}SN{n}": g * s[n] * down_s[:, n]}`` ``[batch, d_model]``.

    The router: softmax of ``x @ gate.weight.T``, the top ``k``, renormalised where the config says
    (always for Mixtral, ``norm_topk_prob`` for Qwen2-MoE); each expert ``act(gate) * up`` of its
    ``gate_up_proj``; Qwen2-MoE's shared expert ``act(gate_proj x) * up_proj x`` scaled by
    ``sigmoid(shared_expert_gate x)``.
    """
    block = model.original_model.model.layers[layer].mlp
    config = model.original_model.config
    x = cache[f"blocks.{layer}.mlp.hook_in"][:, pos].double()  # [batch, d]
    act = {"silu": torch.nn.functional.silu}[config.hidden_act]
    probs = torch.softmax(x @ block.gate.weight.detach().double().T, -1)
    top, picked = probs.topk(config.num_experts_per_tok, -1)
    if getattr(config, "norm_topk_prob", True):
        top = top / top.sum(-1, keepdim=True)
    out: Dict[str, torch.Tensor] = {}
    experts = block.experts
    for e in range(experts.gate_up_proj.shape[0]):
        w = (top * (picked == e)).sum(-1, keepdim=True)  # [batch, 1]
        gate, up = (x @ experts.gate_up_proj[e].detach().double().T).chunk(2, -1)
        a = act(gate) * up
        down = experts.down_proj[e].detach().double()  # [d, d_expert]
        for n in range(a.shape[-1]):
            out[f"L{layer}E{e}N{n}"] = w * a[:, n : n + 1] * down[:, n]
    shared = getattr(block, "shared_expert", None)
    if shared is not None:
        g = torch.sigmoid(x @ block.shared_expert_gate.weight.detach().double().T)
        s = act(x @ shared.gate_proj.weight.detach().double().T) * (x @ shared.up_proj.weight.detach().double().T)
        down = shared.down_proj.weight.detach().double()
        for n in range(s.shape[-1]):
            out[f"L{layer}SN{n}"] = g * s[:, n : n + 1] * down[:, n]
    return out
