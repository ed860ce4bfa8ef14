"""Tokens: every tokenizer, no silent substitutions (issue 8, section 3).

A token is named by its exact vocabulary piece, by the text that is read as it, or by
its id; text the tokenizer does not know is refused (answers, targets) or warned about
with its positions (prompts); token text keeps word boundaries and is never empty.
Expected ids come from the tokenizer's own tables (``convert_tokens_to_ids``,
``convert_ids_to_tokens``), never from the code under test.
"""

import io
import warnings

import builders
import numpy as np
import pytest
import torch

import tl_logitlens as tll
from tl_logitlens.inputs import single_token_id
from tl_logitlens.model_access import TransformerBridge, view
from tl_logitlens.tokentext import token_text

raises_before_forward = builders.raises_before_forward

needs_bridge = pytest.mark.skipif(
    TransformerBridge is None, reason="local HF models boot through TransformerBridge (3.x/4.x)"
)
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module")
def model():
    """Word tokenizer: <unk> 0, <bos> 1, <pad> 2, w3..w60; context 24."""
    return builders.word_model()


@pytest.fixture(scope="module")
def stories(models_dir):
    if TransformerBridge is None:
        pytest.skip("real models boot through TransformerBridge")
    return TransformerBridge.boot_transformers(str(models_dir / "stories260k"), device="cpu").eval()


@pytest.fixture(scope="module")
def capp(models_dir):
    if TransformerBridge is None:
        pytest.skip("real models boot through TransformerBridge")
    return TransformerBridge.boot_transformers(str(models_dir / "capp-gpt2"), device="cpu").eval()


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


# -- the word tokenizer ----------------------------------------------------------------------
def test_unknown_answer_or_target_is_refused_before_the_forward_pass(model):
    for call in (
        lambda: tll.direct_logit_attribution(model, "w3 w4 w5", answers="zebra"),
        lambda: tll.direct_logit_attribution(model, "w3 w4 w5", answers="w5", wrong="zebra"),
        lambda: tll.direct_logit_attribution(model, ["w3 w4", "w5 w6"], answers=["w7", "zebra"]),
        lambda: tll.logit_lens(model, "w3 w4 w5", targets="zebra"),
        lambda: tll.logit_lens(model, "w3 w4 w5", targets=["w7", "zebra"]),
    ):
        raises_before_forward(model, tll.LensInputError, r"'zebra' is not in the vocabulary.*<unk>", call)


def test_the_unknown_token_named_literally_is_that_token(model):
    unk = model.tokenizer.unk_token_id
    assert single_token_id(view(model), model.tokenizer.unk_token, "answer") == unk


def test_prompt_words_outside_the_vocabulary_warn_with_their_positions(model):
    with pytest.warns(UserWarning, match=r"unknown token '<unk>' \(id 0\) at positions \[2, 4\]"):
        result = tll.logit_lens(model, "w3 zebra w4 giraffe", positions=-1)
    # The warning tells the truth: those positions hold the unknown token.
    assert result.input_ids[0, 2] == 0 and result.input_ids[0, 4] == 0
    with pytest.warns(UserWarning, match=r"prompt 1: .* at positions \[1\]"):
        tll.logit_lens(model, ["w3 w4", "zebra w5"], positions=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a literal <unk> and known words: no warning
        tll.logit_lens(model, "w3 <unk> w4", positions=-1)


def test_every_token_text_is_non_empty_and_names_its_own_id(model):
    v = view(model)
    for i in range(v.d_vocab):
        text = token_text(model.tokenizer, i)
        assert text and _quiet(single_token_id, v, text, "t") == i


def test_text_longer_than_the_context_is_refused_with_both_lengths(model):
    n_ctx = model.cfg.n_ctx
    words = " ".join(f"w{3 + i % 50}" for i in range(n_ctx + 5))
    length = model.to_tokens(words, truncate=False).shape[1]
    assert length > n_ctx
    for call in (
        lambda: tll.logit_lens(model, words),
        lambda: tll.logit_lens(model, ["w3 w4", words]),
        lambda: tll.direct_logit_attribution(model, words, answers="w5"),
        lambda: tll.logit_lens(model, builders.tokens(1, n_ctx + 1)),
    ):
        raises_before_forward(
            model,
            tll.LensInputError,
            rf"(is {length}|is {n_ctx + 1}) tokens long, longer than the model's context of {n_ctx}",
            call,
        )


def test_token_ids_as_numbers_and_specs_that_are_not_tokens(model):
    v = view(model)
    assert single_token_id(v, np.int64(7), "answer") == 7
    assert single_token_id(v, torch.tensor(7), "answer") == 7
    for bad, match in [
        (7.0, r"is a float; token ids are integers"),
        (np.float32(7), r"token ids are integers"),
        (torch.tensor(7.0), r"integer id"),
        (True, r"not bool"),
        ("", r"empty string"),
        ({"w3": 1}, r"must be a token string or an integer id"),
    ]:
        with pytest.raises(tll.LensInputError, match=match):
            single_token_id(v, bad, "answer")
    # A list of ids as the input is a prompt of token ids (the CLI's --tokens).
    result = tll.logit_lens(model, [1, 5, 6, 7], positions=-1)
    assert result.input_ids.tolist() == [[1, 5, 6, 7]]


def test_demo_model_refuses_an_answer_it_cannot_spell():
    model = tll.demo_model()
    raises_before_forward(
        model,
        tll.LensInputError,
        r"'zebra' is not in the vocabulary",
        lambda: tll.direct_logit_attribution(model, "red cat sun red cat", answers="zebra"),
    )
    n_ctx = model.cfg.n_ctx
    prompt = " ".join(["red cat sun"] * 27)  # 81 words, beyond the demo's context of 64
    length = model.to_tokens(prompt, truncate=False).shape[1]
    assert length > n_ctx
    raises_before_forward(
        model,
        tll.LensInputError,
        rf"is {length} tokens long, longer than the model's context of {n_ctx}",
        lambda: tll.logit_lens(model, prompt),
    )


# -- stories260k: sentencepiece pieces with ▁ ------------------------------------------------
@needs_bridge
def test_stories_pieces_that_do_not_start_a_word_are_named_by_their_spelling(stories):
    v, vocab = view(stories), stories.tokenizer.get_vocab()
    for spelling in [",", "ir", "\u2581a", "\u2581", "."]:
        assert single_token_id(v, spelling, "answer") == vocab[spelling]
    # Text with a leading space names the word-start piece; whole words name theirs.
    assert single_token_id(v, " a", "answer") == vocab["\u2581a"]
    assert single_token_id(v, "Lily", "answer") == vocab["\u2581Lily"]
    # A piece whose text, tokenised, is another token: the piece wins, with a warning naming the other.
    with pytest.warns(UserWarning, match=r"tokenises to a different token, '\u2581a'"):
        assert single_token_id(v, "a", "answer") == vocab["a"]
    tokens = stories.to_tokens(STORY)
    by_text = tll.direct_logit_attribution(stories, tokens, answers=",", positions=-2)
    by_id = tll.direct_logit_attribution(stories, tokens, answers=vocab[","], positions=-2)
    assert torch.equal(by_text.values, by_id.values)
    with pytest.raises(tll.LensInputError, match=r"not a single token: it tokenises to 6 tokens \['\u2581', 'z'"):
        single_token_id(v, "zebra", "answer")


@needs_bridge
def test_stories_token_text_keeps_word_starts_and_is_never_empty(stories):
    tok, v = stories.tokenizer, view(stories)
    pieces = tok.convert_ids_to_tokens(list(range(v.d_vocab)))
    for i, piece in enumerate(pieces):
        text = token_text(tok, i)
        assert text != ""
        if "\u2581" in piece:
            assert text == piece  # the vocabulary's spelling, word-start marker included
        assert _quiet(single_token_id, v, text, "t") == i
    bare = tok.convert_tokens_to_ids("\u2581")
    assert tok.decode([bare]) == ""  # what used to be shown: nothing
    assert token_text(tok, bare) == "\u2581"


@needs_bridge
def test_stories_top_tokens_and_csv_keep_every_token(stories):
    import pandas as pd

    tokens = stories.to_tokens(" a" + STORY)  # holds the bare ▁ piece
    result = tll.logit_lens(stories, tokens, top_k=3)
    pieces = stories.tokenizer.convert_ids_to_tokens
    flat_ids = result.top_ids.reshape(-1).tolist()
    flat_text = [t for layer in result.top_tokens() for row in layer for pos in row for t in pos]
    for i, text in zip(flat_ids, flat_text):
        if "\u2581" in pieces(i):
            assert text == pieces(i)
    frame = result.to_dataframe()
    back = pd.read_csv(io.StringIO(frame.to_csv(index=False)))
    assert not back["token"].isna().any() and not back["input_token"].isna().any()
    assert (back["input_token"] == "\u2581").any()
    assert result.input_tokens()[0] == [token_text(stories.tokenizer, i) for i in tokens[0].tolist()]


@needs_bridge
def test_stories_story_longer_than_the_context_is_refused(stories):
    text = " ".join([STORY] * 40)
    length = stories.to_tokens(text, truncate=False).shape[1]
    assert length > stories.cfg.n_ctx
    raises_before_forward(
        stories,
        tll.LensInputError,
        rf"is {length} tokens long, longer than the model's context of 512",
        lambda: tll.direct_logit_attribution(stories, text, answers=","),
    )


# -- capp-gpt2: word-level, split on | ---------------------------------------------------------
@needs_bridge
def test_capp_unknown_words_are_refused_or_warned(capp):
    tok = capp.tokenizer
    v = view(capp)
    assert single_token_id(v, "<EOC>", "answer") == tok.convert_tokens_to_ids("<EOC>")
    assert single_token_id(v, "5-axis Milling", "answer") == tok.convert_tokens_to_ids("5-axis Milling")
    # capp's unknown token is <PAD>: an unknown word used to become <PAD> silently.
    with pytest.raises(tll.LensInputError, match=r"'zebra' is not in the vocabulary.*'<PAD>'"):
        single_token_id(v, "zebra", "answer")
    with pytest.raises(tll.LensInputError, match=r"not in the vocabulary"):
        tll.logit_lens(capp, torch.tensor([[49, 2, 9]]), targets="drilling")
    # Space-separated words are one unknown piece for a tokenizer that splits on |.
    with pytest.warns(UserWarning, match=r"unknown token '<PAD>' \(id 52\) at positions \[2\]"):
        tll.logit_lens(capp, "<SOS> <EOC>", positions=-1)
    for i in range(v.d_vocab):
        assert _quiet(single_token_id, v, token_text(tok, i), "t") == i


# -- byte-level BPE whose unknown token is also its BOS (GPT-2's <|endoftext|>) -----------------
@needs_bridge
def test_a_bos_that_shares_the_unknown_id_is_not_an_unknown_word():
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["the cat sat on the mat"] * 10,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    eot = "<|endoftext|>"
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=eot, bos_token=eot, eos_token=eot)
    path = builders.temp_dir("bpe-")
    fast.save_pretrained(path)
    tf.GPT2LMHeadModel(
        tf.GPT2Config(
            n_layer=1,
            n_embd=16,
            n_head=2,
            vocab_size=len(fast),
            n_positions=32,
            bos_token_id=fast.bos_token_id,
            eos_token_id=fast.eos_token_id,
        )
    ).save_pretrained(path)
    model = TransformerBridge.boot_transformers(path, device="cpu").eval()
    assert model.tokenizer.unk_token_id == model.to_tokens("the")[0, 0]  # the prepended BOS is the "unknown" id
    v = view(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = tll.logit_lens(model, " the cat", positions=None)
        assert single_token_id(v, " cat", "answer") == fast.convert_tokens_to_ids("\u0120cat")
        assert single_token_id(v, "\u0120cat", "answer") == fast.convert_tokens_to_ids("\u0120cat")
        assert single_token_id(v, eot, "answer") == fast.convert_tokens_to_ids(eot)
    assert result.input_tokens()[0] == [eot, " the", " cat"]  # decoded text, leading space kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # <|endoftext|> typed in the text is the user's token
        tll.logit_lens(model, f" the{eot} cat", positions=-1)
