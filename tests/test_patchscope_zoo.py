"""A self-patch is an identity on every model of the family zoo (tests/zoo.py).

For every decoder-only family TransformerLens 4.x boots, a Patchscope whose source is its own target
(same entry, same position) must read the model's own next-token distribution at every entry, to
float32 rounding: patched runs, the hooks that write them and the kernel's reading of the captured
final stream agree with the model's own logits, post-norms, logit transforms, experts and all.
"""

import builders
import pytest
import torch
import zoo

import tl_logitlens as tll
from tl_logitlens.model_access import TL_MAJOR, TransformerBridge

pytestmark = pytest.mark.skipif(
    TransformerBridge is None or TL_MAJOR < 4,
    reason="the zoo is the families TransformerLens 4.x boots (3.x bridges boot another set, with older transformers)",
)

FAMILIES = zoo.FAMILIES if TransformerBridge is not None and TL_MAJOR >= 4 else []
SOURCE = builders.tokens(batch=1, seq=7, seed=4)[0]  # words of the zoo's vocabulary, after bos


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_self_patch_is_the_identity(family):
    model = zoo.model(family)
    try:
        with torch.no_grad():
            own = torch.log_softmax(model(SOURCE.view(1, -1))[0, -2].double(), -1)
    except RuntimeError as err:  # TransformerLens's own forward pass fails: nothing here to test
        pytest.skip(f"TransformerLens cannot run {family.name}: {err}")
    result = tll.patchscope(model, SOURCE, target=SOURCE, positions=-2, target_position=-2, progress=False)
    n, k = len(result.labels), result.top_ids.shape[-1]
    assert result.labels[0] == "0_pre" and result.labels[-1] == "final_post"
    assert torch.equal(result.top_ids[..., 0], own.argmax().expand(n, 1))
    torch.testing.assert_close(
        result.top_probs.double(), own.exp().topk(k).values.expand(n, 1, k), atol=2e-5, rtol=1e-4
    )
    assert float(result.kl_to_final.abs().max()) <= 1e-5
