"""Interop with EleutherAI's tuned-lens 0.2.0, the reference implementation (``-m interop``).

Lenses travel both ways and read the same: a lens made and saved by tuned-lens loads here
with ``TunedLens.load`` and ``logit_lens(..., lens=...)`` gives tuned-lens's own per-layer
log-probabilities; a lens saved here loads in tuned-lens with
``TunedLens.from_model_and_pretrained`` and reads the same there. The tuned-lens side is
tests/interop/tuned_lens_side.py, run as a subprocess by the python named in
``TL_LOGITLENS_TUNED_LENS_PYTHON`` (a separate venv with torch and tuned-lens==0.2.0: it
cannot share a venv with transformer-lens 4); it never imports tl_logitlens, so every
expected number here comes from tuned-lens and Hugging Face ``transformers``.

Tolerance: both sides run the same float32 weights with eager attention, so they differ
only by the order of float32 operations. The reference side also measures the gap between
Hugging Face's sdpa and eager attention on the final log-probabilities (~1e-5, the note
/work/shared/notes/tuned-lens-0.2.0.md), which is the size of disagreement that float32
reordering alone produces in this model. The log-probabilities must agree within
``LOGP_ATOL`` = 1e-4, ten times the note's gap, and the measured gap must stay below half of
that, so the tolerance always sits well above this machine's float32 noise (measured on
stories260k and capp-gpt2: differences <= 1.2e-5, gaps 4e-6 to 2e-5). A wrong
translator (transposed, shifted by a layer, applied twice to the final entry) moves the
readings by orders of magnitude more (checked below: the tuned readings differ from the
plain logit lens's by far more than the tolerance).
"""

import json
import os
import subprocess
import warnings
from pathlib import Path

import builders
import pytest
import torch

import tl_logitlens as tll
from tl_logitlens.model_access import unembed_hash

pytestmark = pytest.mark.interop

ENV = "TL_LOGITLENS_TUNED_LENS_PYTHON"
SIDE = Path(__file__).parent / "interop" / "tuned_lens_side.py"
LOGP_ATOL = 1e-4

# Fixed inputs, given as ids to both sides so that tokenisation plays no part.
TOKENS = {
    # stories260k: STORY tokenised by the bridge, and a second row of seeded random pieces.
    "stories260k": None,  # filled from the model's tokenizer in the fixture (same ids go to both sides)
    # capp-gpt2: <SOS>=49 ... <EOC>=50 ...; its tokenizer splits on '|', so ids are given.
    "capp-gpt2": [[49, 3, 7, 12, 20, 50, 30, 31], [49, 4, 8, 15, 50, 33, 34, 35]],
}
STORY = "Once upon a time, there was a little girl"


@pytest.fixture(scope="module")
def ref_python():
    """The reference venv's python, or skip when ``TL_LOGITLENS_TUNED_LENS_PYTHON`` is unset."""
    path = os.environ.get(ENV)
    if not path:
        pytest.skip(f"{ENV} is not set to the python of a venv with tuned-lens==0.2.0 (see `make test-interop`)")
    # Set but unusable is a broken setup, not a reason to skip: fail and say why.
    probe = subprocess.run(
        [path, "-c", "import importlib.metadata as m, tuned_lens, transformers; print(m.version('tuned-lens'))"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=120,
    )
    if probe.returncode != 0:
        pytest.fail(f"{ENV}={path} cannot import tuned_lens: {probe.stderr.strip()[-800:]}")
    version = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else "?"
    if version != "0.2.0":
        pytest.fail(f"{ENV}={path} has tuned-lens {version}; these tests pin the 0.2.0 format")
    return path


def _clean_env():
    # The reference side must not see this checkout (PYTHONPATH) or anything of ours.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _side(ref_python, command, model_dir, lens_dir, readings, tokens, seed=0):
    proc = subprocess.run(
        [
            ref_python,
            str(SIDE),
            command,
            "--model",
            str(model_dir),
            "--lens",
            str(lens_dir),
            "--readings",
            str(readings),
            "--tokens",
            json.dumps(tokens),
            "--seed",
            str(seed),
        ],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"the tuned-lens side failed ({command}):\n{proc.stderr[-3000:]}")
    return torch.load(readings, weights_only=True)


@pytest.fixture(scope="module", params=["stories260k", "capp-gpt2"])
def real(request, models_dir):
    """(name, folder, bridge, token ids) for a real model, booted unprocessed."""
    if builders.TransformerBridge is None:
        pytest.skip("needs TransformerBridge (transformer-lens 3.x or 4.x) to boot the Hugging Face folder")
    name = request.param
    folder = models_dir / name
    bridge = builders.TransformerBridge.boot_transformers(str(folder), device="cpu").eval()
    tokens = TOKENS[name]
    if tokens is None:
        first = bridge.to_tokens(STORY)[0].tolist()
        g = torch.Generator().manual_seed(1)
        second = [first[0]] + torch.randint(3, bridge.cfg.d_vocab, (len(first) - 1,), generator=g).tolist()
        tokens = [first, second]
    return name, folder, bridge, tokens


def _ours(bridge, tokens, lens):
    """Our per-entry log-probabilities ``[entry, batch, pos, d_vocab]`` (float64) through ``lens``."""
    result = tll.logit_lens(bridge, torch.tensor(tokens), lens=lens, targets=list(range(bridge.cfg.d_vocab)))
    assert result.labels == [f"{i}_pre" for i in range(bridge.cfg.n_layers)] + ["final_post"]
    return torch.log_softmax(result.target_logits.double(), -1), result


def _agree(ours, theirs, gap, what):
    """Per-entry log-probs within tolerance; top-1 tokens equal wherever the reference's is clear."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert gap < LOGP_ATOL / 2, (
        f"{what}: sdpa and eager attention differ by {gap:.1e} here, more than the "
        "note's ~1e-5: the float32 noise floor no longer justifies LOGP_ATOL"
    )
    atol = LOGP_ATOL
    diff = (ours - theirs).abs().amax(dim=(1, 2, 3))
    print(
        f"{what}: max |d log p| per entry {[f'{d:.1e}' for d in diff.tolist()]} (tolerance {atol:g}, sdpa gap "
        f"{gap:.1e})"
    )
    assert bool((diff <= atol).all()), f"{what}: per-entry max |log p| difference {diff.tolist()} > {atol:g}"
    top2 = theirs.topk(2, dim=-1)
    clear = (top2.values[..., 0] - top2.values[..., 1]) > 2 * atol
    assert bool(clear.any())
    assert torch.equal(ours.argmax(-1)[clear], top2.indices[..., 0][clear]), f"{what}: top-1 tokens differ"
    return float(diff.max())


def _not_vacuous(bridge, tokens, theirs):
    # The tuned readings must be far from the plain logit lens's, or agreement proves nothing.
    plain, _ = _ours(bridge, tokens, None)
    moved = (plain[:-1] - theirs[:-1]).abs().amax(dim=(1, 2, 3))
    assert bool((moved > 100 * LOGP_ATOL).all()), moved.tolist()


def test_a_lens_made_by_tuned_lens_reads_the_same_here(real, ref_python, tmp_path):
    name, folder, bridge, tokens = real
    lens_dir = tmp_path / "theirs"
    ref = _side(ref_python, "make", folder, lens_dir, tmp_path / "theirs.pt", tokens, seed=3)
    assert ref["n_translators"] == bridge.cfg.n_layers
    assert json.loads((lens_dir / "config.json").read_text())["unembed_hash"] == unembed_hash(bridge)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a hash mismatch would warn: the hashes agree, so none may
        lens = tll.TunedLens.load(lens_dir, bridge)
    assert lens.labels == [f"{i}_pre" for i in range(bridge.cfg.n_layers)]
    ours, result = _ours(bridge, tokens, lens)
    assert result.lens_name == "tuned"
    _agree(ours, ref["log_probs"], ref["sdpa_gap"], f"{name}: tuned-lens -> tl_logitlens")
    _not_vacuous(bridge, tokens, ref["log_probs"])


@pytest.mark.parametrize("incl_mid", [False, True], ids=["pre", "with-mid"])
def test_a_lens_saved_here_reads_the_same_in_tuned_lens(real, ref_python, tmp_path, incl_mid):
    name, folder, bridge, tokens = real
    if incl_mid and name != "stories260k":
        pytest.skip("the _mid extras are checked once")
    lens = builders.randomise_lens(tll.TunedLens(bridge, incl_mid=incl_mid), seed=5)
    lens_dir = tmp_path / "ours"
    lens.save(lens_dir)
    ref = _side(ref_python, "read", folder, lens_dir, tmp_path / "ours.pt", tokens)
    # tuned-lens's fingerprint of the same unembedding is the one we wrote, so it loads silently
    # (it logs a warning on a hash mismatch and one per config key it does not know).
    assert ref["unembed_hash"] == unembed_hash(bridge) == lens.unembed_hash
    assert ref["config"]["unembed_hash"] == lens.unembed_hash
    assert ref["warnings"] == []
    assert ref["n_translators"] == bridge.cfg.n_layers
    ours, _ = _ours(bridge, tokens, lens)
    _agree(ours, ref["log_probs"], ref["sdpa_gap"], f"{name}: tl_logitlens -> tuned-lens")
    _not_vacuous(bridge, tokens, ref["log_probs"])
