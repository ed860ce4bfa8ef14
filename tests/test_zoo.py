"""Every decoder-only family TransformerLens 4.3 boots (tests/zoo.py): the lens and direct logit attribution
by component, head, neuron and source, exact against independent references computed from the Hugging Face
model itself (its own logits, its own norm modules read as linear maps, its own weights), in float32.

The bfloat16 sweep of the same families is marked ``zoo_bf16`` (``make test-zoo``; CI runs it).
"""

from __future__ import annotations

import re

import builders
import pytest
import reference
import torch
import zoo

import tl_logitlens as tll
from tl_logitlens.model_access import TL_MAJOR, TransformerBridge

pytestmark = pytest.mark.skipif(
    TransformerBridge is None or TL_MAJOR < 4,
    reason="the zoo is the families TransformerLens 4.x boots (3.x bridges boot another set, with older transformers)",
)

TOKENS = builders.tokens(batch=2, seq=7, seed=2)
ANSWERS = torch.tensor([5, 9])
WRONG = torch.tensor([7, 30])
KINDS = ("component", "head", "neuron")
FAMILIES = zoo.FAMILIES if TransformerBridge is not None and TL_MAJOR >= 4 else []


class Member:
    """One family booted in one dtype, with a full cache of the tokens and the HF model's own logits."""

    def __init__(self, family: zoo.Family, dtype: torch.dtype):
        self.family, self.dtype = family, dtype
        self.model = zoo.model(family, dtype)
        self.broken, self._dla, self._lens = None, {}, None
        try:
            with torch.no_grad():
                self.model(TOKENS)
        except RuntimeError as err:  # TransformerLens's own forward pass fails: nothing here to test
            self.broken = f"TransformerLens cannot run {family.name} in {dtype}: {err}"
            return
        with torch.no_grad():
            _, self.cache = self.model.run_with_cache(TOKENS)
            self.hf_logits = self.model.original_model(input_ids=TOKENS).logits.double()

    def supports(self, by: str) -> bool:
        return by not in self.family.refuses

    def dla(self, by: str):
        """The attribution of ``ANSWERS - WRONG`` at the last position (by head: with the sources), once."""
        if by not in self._dla:
            kw = {"by_source": True} if by == "head" else {}
            self._dla[by] = _dla(self, by, **kw)
        return self._dla[by]

    def lens(self):
        """The lens with every token as a target, once."""
        if self._lens is None:
            self._lens = tll.logit_lens(self.model, TOKENS, targets=list(range(builders.D_VOCAB)), top_k=3)
        return self._lens


_MEMBERS = {}


def member_of(family: zoo.Family, dtype: torch.dtype = torch.float32) -> Member:
    key = (family.name, dtype)
    if key not in _MEMBERS:
        _MEMBERS[key] = Member(family, dtype)
    return _MEMBERS[key]


@pytest.fixture(params=FAMILIES, ids=[f.name for f in FAMILIES])
def member(request):
    found = member_of(request.param)
    if found.broken:
        pytest.skip(found.broken)
    return found


def _close(ours: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-4) -> float:
    """Assert ``|ours - expected| <= rtol * (1 + |expected|)`` elementwise; return the largest gap."""
    ours, expected = ours.double(), expected.double()
    gap = (ours - expected).abs()
    bound = rtol * (1 + expected.abs())
    assert bool((gap <= bound).all()), f"{what}: max gap {gap.max().item():.3g} (bound {bound.max().item():.3g})"
    return gap.max().item()


# -- the lens -------------------------------------------------------------------------------------------------


def test_lens_final_entry_is_the_hf_models_own_output(member):
    ours = member.lens().target_logits[-1].double()  # [batch, pos, vocab]: after the model's logit transform
    _close(ours, member.hf_logits, "final-entry logits")
    _close(torch.log_softmax(ours, -1), torch.log_softmax(member.hf_logits, -1), "final-entry log-probs")


def test_lens_entries_match_the_hf_norm_and_head(member):
    """Every entry is the HF final norm on that stream (its own statistics), then lm_head, then the family's
    logit transform (Granite's 1 / logits_scaling, Cohere's logit_scale, Gemma 2's soft cap, from the HF model)."""
    model, cache = member.model, member.cache
    labels, stack = reference.accumulated(model, cache)
    hf = model.original_model
    norm = getattr(model.ln_final, "original_component", None) or model.ln_final
    with torch.no_grad():
        logits = hf.get_output_embeddings()(norm(stack)).double() * reference.logit_scale(model)
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    result = member.lens()
    assert result.labels == labels
    _close(result.target_logits.double(), logits, "lens logits at every entry")


# -- direct logit attribution ---------------------------------------------------------------------------------


def _dla(member: Member, by: str, **kw):
    return tll.direct_logit_attribution(member.model, TOKENS, answers=ANSWERS, wrong=WRONG, by=by, **kw)


def _hf_difference(member: Member) -> torch.Tensor:
    last = member.hf_logits[:, -1]
    rows = torch.arange(TOKENS.shape[0])
    return last[rows, ANSWERS] - last[rows, WRONG]


def test_every_kind_adds_up_to_the_hf_models_logit_difference(member):
    cap = getattr(member.model.original_model.config, "final_logit_softcapping", None)
    for by in KINDS:
        if not member.supports(by):
            continue
        att = member.dla(by)
        assert att.residual_error() <= 1e-4, by
        if cap:  # the pieces add up to the pre-cap difference; the model reports the capped one
            assert att.logit_transform == f"logit -> {cap:g} * tanh(logit / {cap:g}) (a soft cap)"
            _close(att.capped_value, _hf_difference(member), f"{by}: capped value")
            last = member.hf_logits[:, -1]
            assert bool((last.abs() < 0.99 * cap).all())  # atanh is well conditioned here
            pre = cap * torch.atanh(last / cap)
            rows = torch.arange(TOKENS.shape[0])
            _close(att.model_value, pre[rows, ANSWERS] - pre[rows, WRONG], f"{by}: pre-cap value")
        else:
            assert att.logit_transform is None and att.capped_value is None
            _close(att.model_value, _hf_difference(member), f"{by}: model value")


def _reference_values(member: Member, pieces: dict) -> dict:
    read, _ = reference.family_readout(member.model, member.cache, ANSWERS, WRONG)
    return dict(zip(pieces, read(torch.stack(list(pieces.values())))))


def _check_pieces(att, expected: dict, what: str, rtol: float = 1e-4) -> None:
    index = [att.labels.index(label) for label in expected]
    _close(att.values[index], torch.stack(list(expected.values())), what, rtol=rtol)


def test_heads_match_the_hand_reference(member):
    if not member.supports("head"):
        pytest.skip(f"{member.family.name} refuses by='head'")
    att = member.dla("head")
    expected = _reference_values(member, reference.family_pieces(member.model, member.cache, "head"))
    _check_pieces(att, expected, "heads and attention biases")
    read, constant = reference.family_readout(member.model, member.cache, ANSWERS, WRONG)
    _close(att.constant, constant, "constant")


def test_neurons_match_the_hand_reference(member):
    if not member.supports("neuron"):
        pytest.skip(f"{member.family.name} refuses by='neuron'")
    att = member.dla("neuron")
    pieces = reference.family_pieces(member.model, member.cache, "neuron")
    if member.family.hand_experts:
        for layer in range(member.model.cfg.n_layers):
            if reference.is_expert_layer(member.model, layer):
                pieces.update(reference.expert_pieces(member.model, member.cache, layer))
    if not pieces:
        pytest.skip("every layer is an expert layer without a hand reference (its layers are checked by the stack)")
    _check_pieces(att, _reference_values(member, pieces), "neurons and MLP biases")


def test_each_layers_pieces_add_up_to_what_it_wrote(member):
    """Heads (with the attention biases) sum to ``hook_attn_out``, neurons (experts and shared experts included)
    to ``hook_mlp_out``: layer by layer, not only in total."""
    model, cache = member.model, member.cache
    for by, hook, mark in (("head", "hook_attn_out", "H"), ("neuron", "hook_mlp_out", "N")):
        if not member.supports(by):
            continue
        stack = tll.residual_stack(cache, by=by, positions=[0, -1])
        for layer in range(model.cfg.n_layers):
            mine = re.compile(rf"L{layer}(E\d+|S)?{mark}\d+|{layer}_(attn|mlp|E\d+|shared)(_norm)?_bias")
            rows = [i for i, label in enumerate(stack.labels) if mine.fullmatch(label)]
            expected = cache[f"blocks.{layer}.{hook}"][:, [0, -1]]
            _close(stack.values[rows].sum(0), expected, f"{by} pieces of layer {layer}", rtol=1e-5)


def test_sources_add_up_to_heads_and_match_the_hand_reference(member):
    if not member.supports("head"):
        pytest.skip(f"{member.family.name} refuses by='head'")
    att = member.dla("head")
    torch.testing.assert_close(att.by_source().sum(2), att.by_head(), atol=1e-5, rtol=0)
    read, _ = reference.family_readout(member.model, member.cache, ANSWERS, WRONG)
    raw = reference.source_pieces(member.model, member.cache)  # {head: [src, batch, d]}, before the write
    for layer in range(member.model.cfg.n_layers):
        write = reference._sublayer_map(member.model, member.cache, layer, "attn", -1)
        for head in range(member.model.cfg.n_heads):
            expected = read(write(raw[f"L{layer}H{head}"]))
            _close(att.by_source()[layer, head], expected, f"sources of L{layer}H{head}")


# -- what is refused, and why -----------------------------------------------------------------------------------

REFUSING = [f for f in FAMILIES if f.refuses]


@pytest.mark.parametrize("family", REFUSING, ids=[f.name for f in REFUSING])
def test_refusals_name_the_real_mechanism(family):
    member = member_of(family)
    for by, words in family.refuses.items():
        with pytest.raises(tll.UnsupportedModelError, match=re.escape(words)):
            _dla(member, by)
    tll.logit_lens(member.model, TOKENS)  # the lens still reads the model exactly


# -- bfloat16 (marker zoo_bf16: make test-zoo) ------------------------------------------------------------------


def _logit_tolerance(member: Member) -> torch.Tensor:
    """``[batch]``: how far the model's own bfloat16 logit difference may sit from a float64 reading of its stored
    final stream: each logit and the normalised stream are rounded once to the dtype (``2 * eps * sum_t (|l_t| +
    |n| @ |k * W_U[t]|)``), plus ``1e-4 * (1 + |value|)``."""
    model, cache = member.model, member.cache
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, -1]
    n = reference.copy.deepcopy(reference._hf_norm(model.ln_final)).double()(final.double()).abs()
    W = model.original_model.get_output_embeddings().weight.detach().double().abs() * abs(reference.logit_scale(model))
    last = member.hf_logits[:, -1]
    rows = torch.arange(TOKENS.shape[0])
    size = sum(last[rows, ids].abs() + (n * W[ids]).sum(-1) for ids in (ANSWERS, WRONG))
    eps = torch.finfo(member.dtype).eps
    return 2 * eps * size + 1e-4 * (1 + _hf_difference(member).abs())


@pytest.mark.zoo_bf16
@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_bfloat16(family):
    """The lens (its final entry is checked against the model inside), and every kind of attribution: the
    pieces plus their ``rounding`` entry add up to the stored stream's reading, the model's own bfloat16 logit
    difference lies within its rounding of that reading, and the pieces agree with the float64 reference read
    from the same bfloat16 activations."""
    member = member_of(family, torch.bfloat16)
    if member.broken:
        pytest.skip(member.broken)
    tll.logit_lens(member.model, TOKENS, targets="next")
    tolerance = _logit_tolerance(member)
    for by in KINDS:
        if not member.supports(by):
            with pytest.raises(tll.UnsupportedModelError, match=re.escape(family.refuses[by])):
                _dla(member, by)
            continue
        att = _dla(member, by, by_source=by == "head")
        assert att.residual_error() <= 1e-4, by
        reported = att.capped_value if att.capped_value is not None else att.model_value
        gap = (reported.double() - _hf_difference(member)).abs()
        assert bool((gap <= tolerance).all()), f"{by}: {gap.max().item():.3g} beyond {tolerance.max().item():.3g}"
        if by == "head":
            rounding = 0 if att.source_rounding is None else att.source_rounding
            _close(att.by_source().sum(2) + rounding, att.by_head(), "sources", rtol=1e-5)
        if by != "component":
            pieces = reference.family_pieces(member.model, member.cache, by)
            if pieces:
                # Both read the same bfloat16 activations, so they agree to float32 precision.
                _check_pieces(att, _reference_values(member, pieces), f"{by} pieces", rtol=1e-5)


# -- CUDA (marker gpu: skips without a device) -------------------------------------------------------------------

ON_CUDA = [
    zoo.by_name(n) for n in ("gemma2", "gemma3", "olmo2", "granite", "cohere", "mixtral", "qwen2_moe", "gpt_oss")
]


@pytest.mark.gpu
@pytest.mark.parametrize("family", ON_CUDA, ids=[f.name for f in ON_CUDA])
def test_families_on_cuda_read_as_on_the_cpu(family):
    """Post-norms, logit transforms and experts on a CUDA model: every kind adds up, and agrees with the same
    model on the CPU (float32; products on either device round differently, so to 1e-4)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cuda = zoo.model(family, torch.float32, "cuda")
    cpu = member_of(family)
    tll.logit_lens(cuda, TOKENS.cuda())  # checks its final entry against the model's own logits
    for by in KINDS:
        att = tll.direct_logit_attribution(cuda, TOKENS.cuda(), answers=ANSWERS, wrong=WRONG, by=by)
        assert att.residual_error() <= 1e-4 and att.values.device.type == "cpu"
        _close(att.values, cpu.dla(by).values, f"{by} on CUDA against the CPU", rtol=1e-4)
