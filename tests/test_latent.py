"""word_tokens (token sets of words in SentencePiece, byte-level BPE and word-level vocabularies) and
latent_language (per-entry group probabilities with confidence intervals), against vocabularies written
by hand, full float64 logits (tests/reference.py), and Gemma-3-270m's own vocabulary and logits."""

import math
import warnings

import builders
import pretrained
import pytest
import reference
import torch

import tl_logitlens as tll
from tl_logitlens.latent import t_quantile_975


class Vocab:
    """A tokenizer reduced to what word_tokens reads: its vocabulary."""

    def __init__(self, pieces):
        self.table = {p: i for i, p in enumerate(pieces)}

    def get_vocab(self):
        return dict(self.table)


FILLER = [f"<x{i}>" for i in range(40)]
# SentencePiece: ▁ pieces, byte fallback; "花" is no piece, its first UTF-8 byte is 0xE8.
SP = Vocab(
    ["<unk>", "▁m", "m", "▁ma", "ma", "ison", "▁maison", "▁fl", "ower", "<0xE8>", "<0x8A>", "▁", "▁sea"]
    + [f"▁w{i}" for i in range(20)]
)
# Byte-level BPE: Ġ is the space byte; "é" is the two bytes Ã ©; "花" starts with the byte piece è.
BL = Vocab(
    ["Ġm", "m", "Ġma", "ma", "ison", "Ġmaison", "Ã", "©", "Ġt", "Ġth", "ĠthÃ©", "è", "Ġè"]
    + [f"Ġw{i}" for i in range(20)]
)


def ids(vocab, pieces):
    return sorted(vocab.table[p] for p in pieces)


def test_sentencepiece_prefixes_with_and_without_the_marker():
    assert tll.word_tokens(SP, "maison") == ids(SP, ["▁m", "m", "▁ma", "ma", "▁maison"])
    assert tll.word_tokens(SP, "maison", word_start="with") == ids(SP, ["▁m", "▁ma", "▁maison"])
    assert tll.word_tokens(SP, "maison", word_start="without") == ids(SP, ["m", "ma"])
    assert tll.word_tokens(SP, "maison", prefixes=False) == ids(SP, ["▁maison"])
    assert tll.word_tokens(SP, "花") == ids(SP, ["<0xE8>"])  # the first byte only, not <0x8A>
    assert tll.word_tokens(SP, ["maison", "sea"], word_start="with") == ids(SP, ["▁m", "▁ma", "▁maison", "▁sea"])


def test_byte_level_prefixes_spell_bytes():
    assert tll.word_tokens(BL, "maison") == ids(BL, ["Ġm", "m", "Ġma", "ma", "Ġmaison"])
    assert tll.word_tokens(BL, "thé", word_start="with") == ids(BL, ["Ġt", "Ġth", "ĠthÃ©"])  # é is the bytes Ã ©
    assert tll.word_tokens(BL, "花") == ids(BL, ["è", "Ġè"])


def test_word_level_vocabulary_and_a_model():
    model = tll.demo_model()
    vocab = model.tokenizer.get_vocab()
    assert tll.word_tokens(model, "cat") == [vocab["cat"]]
    assert tll.word_tokens(model, ["cat", "dog"]) == sorted([vocab["cat"], vocab["dog"]])


def test_shared_tokens_warn_naming_them():
    with pytest.warns(UserWarning, match=r"'fr' and 'en' share 2 token\(s\): '▁m' \(1\), 'm' \(2\)"):
        sets = tll.word_tokens(SP, {"fr": "maison", "en": "m"})
    assert sets["en"] == ids(SP, ["▁m", "m"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tll.word_tokens(SP, {"fr": "maison", "en": "sea"})  # nothing shared: no warning


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"words": "zzz"}, "no token of this sentencepiece vocabulary spells 'zzz'"),
        ({"words": ""}, "must be a word or a non-empty list of words"),
        ({"words": []}, "must be a word or a non-empty list of words"),
        ({"words": {}}, "empty dict"),
        ({"words": "maison", "word_start": "start"}, "word_start must be one of"),
        ({"words": "maison", "prefixes": "yes"}, "prefixes must be True or False"),
    ],
)
def test_word_tokens_errors(kwargs, match):
    with pytest.raises(tll.LensInputError, match=match):
        tll.word_tokens(SP, **kwargs)


# -- latent_language ----------------------------------------------------------------------------------
PROMPTS = ["w3 w4 w5 w6", "w7 w8", "w9 w10 w11", "w12 w13 w14 w15 w16", "w17 w18 w19", "w20 w21"]
GROUPS = {"one": [[30], [31, 32], [33], [34], [35, 36, 37], [38]], "two": [[40], [41], [42, 43], [44], [45], [46]]}


@pytest.fixture(scope="module")
def word_model():
    return builders.word_model()


def test_group_probabilities_match_full_logits(word_model):
    out = tll.latent_language(word_model, PROMPTS, GROUPS, batch_size=4)
    assert out.dropped == [] and out.prompts == PROMPTS
    for i, prompt in enumerate(PROMPTS):
        tokens = word_model.to_tokens(prompt)
        logits = reference.lens_logits64(word_model, tokens)[:, 0, -1]  # [entry, d_vocab]
        probs, _ = reference.group_stats(logits, [GROUPS["one"][i], GROUPS["two"][i]])
        torch.testing.assert_close(out.probs[i].double(), probs, atol=2e-6, rtol=1e-5)
        logp = torch.log_softmax(logits, -1)
        torch.testing.assert_close(out.entropy[i].double(), -(logp.exp() * logp).sum(-1), atol=2e-5, rtol=1e-5)
    # mean and 95% CI by the textbook formula (t with 5 degrees of freedom: 2.5706)
    p = out.probs.double()
    half = 2.5706 * p.std(0) / math.sqrt(len(PROMPTS))
    torch.testing.assert_close(out.ci_high.double(), p.mean(0) + half, atol=1e-5, rtol=2e-3)
    torch.testing.assert_close(out.ci_low.double(), p.mean(0) - half, atol=1e-5, rtol=2e-3)
    one = tll.latent_language(word_model, PROMPTS, GROUPS, batch_size=1)
    torch.testing.assert_close(one.probs, out.probs)


def test_t_quantile_against_the_table():
    # Student's t, 97.5%: the printed table's values
    for dof, t in [(1, 12.706), (3, 3.182), (5, 2.571), (10, 2.228), (30, 2.042), (39, 2.023), (100, 1.984)]:
        assert abs(t_quantile_975(dof) - t) < 4e-3, dof


def test_prompts_whose_groups_share_tokens_are_dropped(word_model):
    groups = {"one": [[30], [31], [32], [33], [34], [35]], "two": [[30], [41], [42, 32], [44], [45], [46]]}
    with pytest.warns(UserWarning, match="2 of 6 prompts dropped"):
        out = tll.latent_language(word_model, PROMPTS, groups)
    assert out.dropped == [0, 2] and out.prompts == [PROMPTS[i] for i in (1, 3, 4, 5)]
    assert out.probs.shape == (4, len(out.labels), 2)


def test_result_table_save_load_plot_page(word_model, tmp_path):
    out = tll.latent_language(word_model, PROMPTS, GROUPS)
    frame = out.to_dataframe()
    assert len(frame) == len(out.labels) * 2 and frame["n_prompts"].eq(6).all()
    out.save(tmp_path / "latent.json")
    back = tll.LatentLanguage.load(tmp_path / "latent.json")
    assert torch.equal(back.probs, out.probs) and back.group_names == ["one", "two"]
    fig = out.plot()
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["one", "two"]
    assert "tll-figure" in out.to_html(tmp_path / "latent.html").read_text()


@pytest.mark.parametrize(
    "prompts, groups, match",
    [
        ("w3 w4", GROUPS, "non-empty list of strings"),
        (PROMPTS, {"one": [[30]]}, "one word .* per prompt: 6 items"),
        (PROMPTS, {}, "groups must be"),
        (PROMPTS, {"one": ["zzzz"] * 6}, "group 'one', prompt 0: no token"),
        (PROMPTS, {"a": [[30]] * 6, "b": [[30]] * 6}, "every one of the 6 prompts"),
    ],
)
def test_latent_language_errors_before_any_forward_pass(word_model, prompts, groups, match):
    builders.raises_before_forward(
        word_model, tll.LensInputError, match, lambda: tll.latent_language(word_model, prompts, groups)
    )


# -- Gemma-3-270m: its own vocabulary and logits (real tier) -------------------------------------------
@pytest.fixture(scope="module")
def gemma_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(pretrained.folder("gemma-3-270m")))


def _brute_force_prefix_set(vocab, word):
    """Every piece that is a non-empty prefix of ``word``, bare or after one ▁: a scan of the whole vocabulary."""
    return sorted(
        i
        for p, i in vocab.items()
        if p.removeprefix("\u2581")
        and word.startswith(p.removeprefix("\u2581"))
        and not p.removeprefix("\u2581").startswith("\u2581")
    )


@pytest.mark.real
@pytest.mark.parametrize("word", ["maison", "fleur", "Blume", "flower", "Schmetterling", "花", "蝴蝶"])
def test_gemma_word_sets_are_the_vocabularys_prefixes(gemma_tokenizer, word):
    vocab = gemma_tokenizer.get_vocab()
    got = tll.word_tokens(gemma_tokenizer, word)
    assert got == _brute_force_prefix_set(vocab, word)
    # the tokenizer's own first token of the word, with and without a leading space, is in the set
    # (after a space a CJK word is spelled as a bare ▁ and then the word: the bare ▁ is no part of it)
    marker = vocab["\u2581"]
    for text in (word, " " + word):
        assert next(i for i in gemma_tokenizer.encode(text, add_special_tokens=False) if i != marker) in got


@pytest.mark.real
def test_gemma_byte_fallback_for_a_character_that_is_no_token(gemma_tokenizer):
    vocab = gemma_tokenizer.get_vocab()
    # A CJK character Gemma's vocabulary lacks (found by scanning the block), so it falls back to bytes.
    char = next(c for c in map(chr, range(0x4E00, 0x9FFF)) if c not in vocab and "\u2581" + c not in vocab)
    first = char.encode("utf-8")[0]
    assert tll.word_tokens(gemma_tokenizer, char) == [vocab[f"<0x{first:02X}>"]]
    assert gemma_tokenizer.convert_ids_to_tokens(gemma_tokenizer.encode(char, add_special_tokens=False))[0] in (
        f"<0x{first:02X}>",
        "\u2581",
    )


@pytest.mark.real
def test_gemma_latent_language_final_entry_is_the_models_own_probability():
    from tl_logitlens.model_access import TransformerBridge

    model = TransformerBridge.boot_transformers(str(pretrained.folder("gemma-3-270m")), device="cpu").eval()
    prompts = ['Français: "chat" - English: "cat"\nFrançais: "fleur" - English: "', 'Deutsch: "Hund" - English: "']
    groups = {"en": ["flower", "dog"], "source": ["fleur", "Hund"]}
    with pytest.warns(UserWarning, match="1 of 2 prompts dropped"):  # flower / fleur share ▁f, ▁fl, f, fl
        out = tll.latent_language(model, prompts, groups)
    tokens = model.to_tokens(prompts[1])
    with torch.no_grad():
        p = torch.softmax(model.original_model(tokens).logits[0, -1].double(), -1)
    for j, name in enumerate(["en", "source"]):
        want = p[tll.word_tokens(model, groups[name][1])].sum()
        assert abs(float(out.probs[0, -1, j]) - float(want)) < 1e-4 * max(1.0, float(want)) + 1e-6
