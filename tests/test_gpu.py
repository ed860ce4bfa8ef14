"""The precision grid on CUDA (float32 and bfloat16), and models split across two GPUs.

Run with ``pytest -m gpu``. Every test skips cleanly without CUDA; the split-model cases
skip without a second device. The references are the float64 ones of test_precision.py
(no tl_logitlens), computed on the model's own devices and brought to the CPU.
"""

import builders
import pytest
import reference
import torch
from test_precision import ANSWERS, TOKENS, WRONG, dla64, lens64
from test_whole_strategy import _reading, _stats64, _worst

import tl_logitlens as tll
from tl_logitlens.evaluate import evaluate_lens
from tl_logitlens.kernel import tuning
from tl_logitlens.model_access import HookedTransformer, TransformerBridge

CUDA = torch.cuda.is_available()
TWO = CUDA and torch.cuda.device_count() >= 2
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]

GRID = builders.precision_cases((torch.float32, torch.bfloat16), device="cuda")


def _split_cases():
    out = []
    if HookedTransformer is not None:
        out.append(
            builders.Case(
                "ht-rms-gqa-split",
                lambda: builders.hooked("RMS", gated=True, rotary=True, n_kv=2, device="cuda", n_devices=2),
                hooked=True,
            )
        )
        out.append(
            builders.Case(
                "ht-ln-split-bf16",
                lambda: builders.hooked("LN", device="cuda", n_devices=2, dtype=torch.bfloat16),
                hooked=True,
            )
        )
    if TransformerBridge is not None:
        out.append(builders.Case("llama-split", lambda: builders.hf_bridge("llama", device_map=builders.LLAMA_SPLIT)))
        out.append(
            builders.Case(
                "llama-split-bf16",
                lambda: builders.hf_bridge("llama", device_map=builders.LLAMA_SPLIT, dtype=torch.bfloat16),
            )
        )
    return out


SPLIT = _split_cases()


def _check_everything(model):
    """Lens statistics and DLA on the model's devices against the float64 reference; results on the CPU."""
    half = model.W_U.dtype in (torch.bfloat16, torch.float16)
    assert tuning.half_products(model.W_U) == half  # the CUDA default
    if half:
        _check_half_products(model)
    ref = lens64(model, TOKENS)
    with tuning.force(half_products=False):  # float32 products: the exact reading of the stored stream
        result = tll.logit_lens(model, TOKENS, targets="next", top_k=3)
    for t in (result.entropy, result.kl_to_final, result.top_ids, result.target_ranks):
        assert t.device.type == "cpu"
    close = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.entropy.double(), ref["entropy"], **close)
    torch.testing.assert_close(result.kl_to_final.double(), ref["kl"], **close)
    torch.testing.assert_close(result.next_token_loss[:, :, :-1].double(), ref["loss"], **close)
    torch.testing.assert_close(result.top_logits.double(), ref["logits"].topk(3, -1).values, **close)

    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS.to(model.W_E.device))
    ref_dla = dla64(model, cache, ANSWERS, WRONG)
    att = tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, wrong=WRONG, by="component")
    assert att.values.device.type == "cpu" and (att.labels[-1] == "rounding") == half
    expected = ref_dla["values"] if half else ref_dla["values"][:-1]
    torch.testing.assert_close(att.values.double(), expected, **close)
    for by in ("head", "neuron"):
        att = tll.direct_logit_attribution(model, TOKENS, answers=ANSWERS, wrong=WRONG, by=by)
        assert (att.values.sum(0) + att.constant - att.model_value).abs().max().item() <= 1e-4
    read = tll.direct_logit_attribution(cache=cache, answers=ANSWERS, wrong=WRONG, by="head")
    assert (read.values.sum(0) + read.constant - read.model_value).abs().max().item() <= 1e-4
    stack = tll.residual_stack(cache, by="neuron", positions=-1)
    assert stack.values.device.type == "cpu"

    data = builders.tokens(batch=4, seq=9, seed=5)
    with tuning.force(half_products=False):
        ev = evaluate_lens(model, data, batch_size=2, progress=False)
    ref_ev = lens64(model, data)
    torch.testing.assert_close(ev.mean("kl_to_final"), ref_ev["kl"][:, :, :-1].mean((1, 2)), **close)
    torch.testing.assert_close(ev.mean("next_token_loss"), ref_ev["loss"].mean((1, 2)), **close)


def _check_half_products(model):
    """The default on CUDA: tensor-core products of the rounded vectors, float32 statistics,
    against float64 statistics of the same rounded vectors (both strategies)."""
    tokens = TOKENS.to(model.W_E.device)
    rounded = _stats64(reference.lens_logits64(model, tokens, round_to=model.W_U.dtype).cpu(), TOKENS)
    for strategy in ("whole", "tiled"):
        with tuning.force(strategy=strategy):
            got = _reading(tll.logit_lens(model, tokens, targets="next", top_k=4))
        assert _worst(got, rounded) <= 1e-4, (strategy, _worst(got, rounded))


@pytest.mark.parametrize("case", GRID, ids=[c.name for c in GRID])
def test_grid_on_cuda(case):
    model = builders.build(case)
    assert model.W_U.device.type == "cuda"
    _check_everything(model)


@pytest.mark.skipif(not TWO, reason="needs two CUDA devices")
@pytest.mark.parametrize("case", SPLIT, ids=[c.name for c in SPLIT])
def test_model_split_across_two_devices(case):
    model = builders.build(case)
    devices = {p.device for p in model.parameters()}
    assert len(devices) == 2, f"the model was not split: {devices}"
    _check_everything(model)
