"""A self-patch is an identity on every model of the family zoo (tests/zoo.py).

The zoo (a tiny random model of every decoder family TransformerLens boots) lives in
``tests/zoo.py``; its expected interface is ``zoo.CASES``, a list of ``(name, builder)`` pairs whose
builder returns the booted model in eval mode. Drafts of it named ``zoo.FAMILIES`` and a
``zoo.boot(family)`` or ``zoo.model(family)`` instead; those are read too. Without the zoo this
module skips.
"""

import pytest
import torch

import tl_logitlens as tll
from tl_logitlens.errors import UnsupportedModelError

zoo = pytest.importorskip("zoo", reason="tests/zoo.py (the family zoo) is not in this checkout")


def _cases():
    cases = getattr(zoo, "CASES", None)
    boot = getattr(zoo, "boot", None) or getattr(zoo, "model", None)
    if cases is None and hasattr(zoo, "FAMILIES") and callable(boot):
        cases = [(family.name, lambda family=family: boot(family)) for family in zoo.FAMILIES]
    return list(cases or [])


CASES = _cases()
SOURCE = torch.tensor([1, 7, 12, 5, 30, 9, 44])  # word ids of the zoo's 61-word vocabulary


@pytest.mark.parametrize("build", [b for _, b in CASES], ids=[name for name, _ in CASES])
def test_self_patch_is_the_identity(build):
    model = build()
    try:
        result = tll.patchscope(model, SOURCE, target=SOURCE, positions=-2, target_position=-2, progress=False)
    except UnsupportedModelError as err:  # the package refuses what it cannot read exactly, loudly
        pytest.skip(f"refused: {err}")
    with torch.no_grad():
        own = torch.log_softmax(model(SOURCE.view(1, -1))[0, -2].double(), -1)
    k = result.top_ids.shape[-1]
    expected = own.exp().topk(k).values.expand(len(result.labels), 1, k)
    assert torch.equal(result.top_ids[..., 0], own.argmax().expand(len(result.labels), 1))
    torch.testing.assert_close(result.top_probs.double(), expected, atol=2e-5, rtol=1e-4)
    assert float(result.kl_to_final.abs().max()) <= 1e-5
