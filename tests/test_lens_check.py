"""One check of ``lens=``, the same at every entry point, and an unembedding identity that survives dtypes (issue 20).

A lens says which model it was built for (``built_for()``, a ``ModelSignature``); every entry point that
takes ``lens=`` refuses, before any forward pass, a lens for another model (layers, width, unembedding),
a class, and a callable that cannot be called as ``lens(vectors, label)``. The same model in bfloat16 is
the same model: its lens is accepted, and loading a lens saved on float32 gives no warning.
"""

import copy
import hashlib
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import builders
import numpy as np
import pytest
import torch

import tl_logitlens as tll
from tl_logitlens.cli import main
from tl_logitlens.errors import LensInputError
from tl_logitlens.lenses import Lens, ModelSignature, check_lens
from tl_logitlens.model_access import unembed_hash, unembed_matches, unembed_sample


@pytest.fixture(scope="module")
def model():
    return tll.demo_model()


@pytest.fixture(scope="module")
def tokens(model):
    return torch.cat([tll.demo.induction_prompt(model, seed=s) for s in range(2)])


def _other_unembedding(model):
    """The same architecture with other unembedding weights (a fine-tuned or another model)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.unembed.parameters():
            if p.ndim == 2:
                p.mul_(1.5).add_(0.01)
    assert not torch.equal(other.W_U, model.W_U)
    return other


def _in_bfloat16(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(model).to(torch.bfloat16)


def _every_entry_point(model, tokens):
    """Each public call that takes ``lens=``, with that lens, on ``model``."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"].detach()
    return {
        "logit_lens": lambda lens: tll.logit_lens(model, tokens, lens=lens),
        "readout": lambda lens: tll.readout(model, final, lens=lens, labels="0_pre"),
        "evaluate_lens": lambda lens: tll.evaluate_lens(model, tokens, lens=lens, progress=False),
        "compare_lenses": lambda lens: tll.compare_lenses(model, tokens, {"x": lens}, progress=False),
        "train_tuned_lens": lambda lens: tll.train_tuned_lens(model, tokens, steps=1, lens=lens, progress=False),
    }


@pytest.mark.parametrize("entry", ["logit_lens", "readout", "evaluate_lens", "compare_lenses", "train_tuned_lens"])
def test_a_lens_for_another_model_is_refused_everywhere_before_the_forward_pass(model, tokens, entry):
    other = builders.word_model()  # d_model 32, n_layers 2; the demo model's d_model is 64
    call = _every_entry_point(model, tokens)[entry]
    builders.raises_before_forward(
        model,
        LensInputError,
        r"TunedLens for another model.*d_model=32.*d_model=64",
        lambda: call(tll.TunedLens(other)),
    )
    builders.raises_before_forward(
        model,
        LensInputError,
        "its unembedding differs from this model's",
        lambda: call(tll.TunedLens(_other_unembedding(model))),
    )


@pytest.mark.parametrize("entry", ["logit_lens", "readout", "evaluate_lens", "compare_lenses", "train_tuned_lens"])
def test_a_class_or_a_callable_of_the_wrong_shape_gets_one_clear_message(model, tokens, entry):
    call = _every_entry_point(model, tokens)[entry]
    builders.raises_before_forward(
        model,
        LensInputError,
        r"lens=TunedLens is a class, not a lens object.*TunedLens.load",
        lambda: call(tll.TunedLens),
    )
    builders.raises_before_forward(
        model,
        LensInputError,
        r"lens=Linear\(\.\.\.\) cannot be called as lens\(vectors, label\): it takes \(input",
        lambda: call(torch.nn.Linear(64, 64)),
    )


def test_the_same_model_in_bfloat16_keeps_its_lens(model, tokens, tmp_path):
    lens = builders.randomise_lens(tll.TunedLens(model), seed=3, scale=0.05)
    low = _in_bfloat16(model)
    assert unembed_hash(low) != unembed_hash(model)  # tuned-lens's hash alone would call it another model
    result = tll.logit_lens(low, tokens, lens=lens)  # accepted
    assert result.lens_name == "tuned"
    lens.save(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no false "another unembedding" warning
        tll.TunedLens.load(tmp_path, low)
    with pytest.warns(UserWarning, match="differs from this model's unembedding"):  # a real mismatch still warns
        tll.TunedLens.load(tmp_path, _other_unembedding(model))


def test_cli_lens_in_bfloat16_gives_no_false_warning(model, tmp_path, capsys):
    tll.TunedLens(model).save(tmp_path / "lens")
    code = main(
        ["lens", "--model", "demo", "--dtype", "bfloat16", "--tokens", "1,5,9", "--lens", str(tmp_path / "lens")]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "warning" not in err


def test_a_new_lens_kind_says_what_it_was_built_for_without_an_isinstance_chain(model, tokens):
    class Scaled(Lens):  # a lens of a kind the package has never seen, built for a 5-layer model
        name = "scaled"

        def transform(self, h, label):
            return 1.1 * h

        def built_for(self):
            return ModelSignature(n_layers=5, d_model=64)

    builders.raises_before_forward(
        model,
        LensInputError,
        "Scaled for another model.*n_layers=5",
        lambda: tll.logit_lens(model, tokens, lens=Scaled()),
    )
    check_lens(lambda h, label: h, None)  # a plain function fits any model


def test_entries_the_lens_cannot_read_are_refused_before_the_forward_pass(model, tokens):
    builders.raises_before_forward(
        model,
        LensInputError,
        r"no translator for stack entry '0_mid' \(nor \['1_mid'\]\).*incl_mid=True",
        lambda: tll.logit_lens(model, tokens, incl_mid=True, lens=tll.TunedLens(model)),
    )


def test_load_with_the_arguments_swapped_says_the_order(model, tmp_path):
    tll.TunedLens(model).save(tmp_path)
    with pytest.raises(LensInputError, match=r"takes the folder first, then the model: TunedLens.load\("):
        tll.TunedLens.load(model, tmp_path)
    with pytest.raises(LensInputError, match="takes the folder first"):
        tll.TunedLens.load(model, str(tmp_path))
    with pytest.raises(LensInputError, match="model must be the HookedTransformer or TransformerBridge"):
        tll.TunedLens.load(tmp_path, None)


# -- the identity itself -----------------------------------------------------------------------------------
def _tuned_lens_hash(weight):
    """tuned-lens 0.2.0's own formula (tuned_lens.utils.tensor_hash), on the whole [d_vocab, d_model] matrix."""
    return hashlib.sha256(np.array_str(weight.detach().float().cpu().numpy(), precision=1).encode()).hexdigest()


@pytest.mark.parametrize("shape", [(7, 200), (300, 5), (10, 10), (40, 30), (64, 83), (1, 5000)])
@pytest.mark.parametrize("scale", [0.02, 1.0, 1e-5, 300.0])
def test_unembed_hash_is_tuned_lenses_from_the_corners_alone(shape, scale):
    W_U = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * scale
    assert unembed_hash(SimpleNamespace(W_U=W_U)) == _tuned_lens_hash(W_U.T)


def test_identity_is_stable_across_dtypes_and_tells_models_apart():
    """A weight near a printed digit's edge (0.04998 prints 0.0, its bfloat16 0.05005 prints 0.1) flips
    tuned-lens's hash; the sample, and the hash compared allowing for rounding, do not flip. (A hash that
    numpy prints in scientific notation, two digits per value, is the documented exception: files of
    this package carry the sample, which never depends on it.)"""
    fails = []
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        W_U = torch.randn(64, 500, generator=gen) * 0.02
        W_U[0, 0] = 0.04998
        f32 = SimpleNamespace(W_U=W_U)
        other = SimpleNamespace(W_U=torch.randn(64, 500, generator=gen) * 0.02)
        for dtype in (torch.bfloat16, torch.float16):
            low = SimpleNamespace(W_U=W_U.to(dtype))
            ok = [
                unembed_matches(low, unembed_sample(f32)),
                unembed_matches(f32, unembed_sample(low)),
                unembed_matches(f32, unembed_hash(low)),
            ]
            scientific = "e-0" in np.array_str(W_U.T.numpy(), precision=1)
            if dtype == torch.bfloat16 and not scientific:
                assert unembed_hash(low) != unembed_hash(f32)
                ok.append(unembed_matches(low, unembed_hash(f32)))
            if not all(ok):
                fails.append((seed, dtype, ok))
        assert not unembed_matches(other, unembed_sample(f32)) and not unembed_matches(other, unembed_hash(f32))
        assert not unembed_matches(SimpleNamespace(W_U=W_U * 1.05), unembed_sample(f32))
    assert not fails


def test_identity_on_real_weights_in_bfloat16():
    """SmolLM2-135M's unembedding: its tuned-lens hash differs between float32 and bfloat16 (a corner at
    0.04998); the comparison does not."""
    cache = Path(os.environ.get("TL_LOGITLENS_MODEL_CACHE", "~/.cache/tl-logitlens-models")).expanduser()
    folder = cache / "smollm2-135m"
    if not (folder / "model.safetensors").is_file():
        pytest.skip("SmolLM2-135M is not fetched (python /work/shared/models/fetch.py)")
    from safetensors.torch import load_file

    weight = load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"]  # tied: lm_head
    f32 = SimpleNamespace(W_U=weight.float().T)
    low = SimpleNamespace(W_U=weight.to(torch.bfloat16).T)
    assert unembed_hash(f32) == _tuned_lens_hash(weight.float())
    assert unembed_hash(low) != unembed_hash(f32)
    assert unembed_matches(low, unembed_hash(f32)) and unembed_matches(low, unembed_sample(f32))
