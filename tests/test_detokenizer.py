"""Tests for the incremental detokenizer, against `tokenizer.decode` of the whole output.

The tokenizers are tiny BPEs trained here, offline: a byte-level one (GPT-2 / SmolLM style, where
multi-byte characters such as CJK and emoji are split over byte tokens) and a Metaspace one
(SentencePiece style, where a token's leading space depends on its context).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allmos.engine.detokenizer import IncrementalDetokenizer

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

SPECIAL = "<|im_end|>"
ENGLISH = "the quick brown fox jumps over the lazy dog. hello world, hello there! "
ALPHABET = list("abcdehlorw .,!\n") + list("éöü日本語🙂🎉") + [SPECIAL]


def _train(pre_tokenizer, decoder, corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(decoder, tokenizers.decoders.ByteLevel) else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[SPECIAL], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=SPECIAL, clean_up_tokenization_spaces=False
    )


@pytest.fixture(scope="module")
def byte_tok():
    """Byte-level BPE; few merges, all on English, so non-ASCII characters stay split over bytes."""
    from tokenizers import decoders, pre_tokenizers

    corpus = [ENGLISH] * 20 + ["héllo wörld 日本語 🙂"]
    return _train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), corpus, 300)


@pytest.fixture(scope="module")
def metaspace_tok():
    """SentencePiece-style BPE: '▁' marks a space, and decoding drops the first token's one."""
    from tokenizers import decoders, pre_tokenizers

    corpus = [ENGLISH] * 20
    return _train(pre_tokenizers.Metaspace(), decoders.Metaspace(), corpus, 120)


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _chunks(ids: list[int], sizes: list[int]) -> list[list[int]]:
    """Split `ids` into consecutive chunks of the given sizes (cycled)."""
    out, i, k = [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)] if sizes else 1
        out.append(ids[i:i + n])
        i, k = i + n, k + 1
    return out


def _stream(tok, ids, chunk_sizes=(1,), prompt=(), **kwargs):
    """Run the detokenizer; return (per-update deltas, finish delta, detokenizer)."""
    detok = IncrementalDetokenizer(tok, list(prompt), **kwargs)
    deltas = []
    for chunk in _chunks(ids, list(chunk_sizes)):
        if detok.is_finished:
            break
        deltas.append(detok.update(chunk).delta)
    return deltas, detok.finish(), detok


def _first_stop_cut(text: str, stop: str, include: bool) -> str:
    """Reference truncation for a single stop string."""
    i = text.find(stop)
    if i < 0:
        return text
    return text[:i + len(stop)] if include else text[:i]


# ---------------------------------------------------------------- decoding


def test_tokenizer_splits_multibyte_characters(byte_tok):
    for ch in "日🙂é":
        assert len(_encode(byte_tok, ch)) > 1, "the test tokenizer should split multi-byte characters"


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(ALPHABET), max_size=40),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    skip=st.booleans(),
)
def test_deltas_concatenate_to_decode(byte_tok, pieces, sizes, skip):
    ids = _encode(byte_tok, "".join(pieces))
    expected = byte_tok.decode(ids, skip_special_tokens=skip)
    deltas, last, detok = _stream(byte_tok, ids, sizes, skip_special_tokens=skip)
    assert "".join(deltas) + last == expected
    assert detok.output_text == expected
    if "\ufffd" not in expected:
        assert all("\ufffd" not in d for d in deltas + [last])


@settings(max_examples=150, deadline=None)
@given(
    ids=st.lists(st.integers(0, 299), max_size=30),
    prompt=st.lists(st.integers(0, 299), max_size=8),
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3),
)
def test_arbitrary_ids_including_invalid_utf8(byte_tok, ids, prompt, sizes):
    """Random byte tokens make broken UTF-8 (and prompts ending mid-character): still equal to decode."""
    deltas, last, _ = _stream(byte_tok, ids, sizes, prompt=prompt)
    assert "".join(deltas) + last == byte_tok.decode(ids, skip_special_tokens=True)


def test_incomplete_character_is_held_back_then_released(byte_tok):
    ids = _encode(byte_tok, "a🙂b")
    detok = IncrementalDetokenizer(byte_tok, [])
    deltas = [detok.update([i]).delta for i in ids]
    assert deltas[0] == "a"
    assert deltas[1:-2] == [""] * (len(ids) - 3)  # the emoji's first bytes: nothing yet
    assert deltas[-2:] == ["🙂", "b"]
    assert detok.finish() == ""


def test_text_before_an_incomplete_character_is_not_held(byte_tok):
    ids = _encode(byte_tok, "hello🙂")
    detok = IncrementalDetokenizer(byte_tok, [], stop=["o"], include_stop_str_in_output=True)
    update = detok.update(ids[:-1])  # "hello" plus the emoji's first bytes
    assert (update.delta, update.stop_string) == ("hello", "o")


def test_prompt_ending_inside_a_character(byte_tok):
    ids = _encode(byte_tok, "ab日x")
    split = len(_encode(byte_tok, "ab")) + 1  # the prompt keeps the first byte of 日
    prompt, output = ids[:split], ids[split:]
    assert byte_tok.decode(prompt).endswith("\ufffd")
    deltas, last, _ = _stream(byte_tok, output, prompt=prompt)
    assert "".join(deltas) + last == byte_tok.decode(output)


def test_finish_flushes_an_incomplete_character(byte_tok):
    ids = _encode(byte_tok, "x日")[:-1]  # drop the last byte of 日
    deltas, last, _ = _stream(byte_tok, ids)
    assert "".join(deltas) == "x"
    assert "".join(deltas) + last == byte_tok.decode(ids)
    assert last.endswith("\ufffd")


def test_skip_special_tokens(byte_tok):
    ids = _encode(byte_tok, f"hello{SPECIAL} world{SPECIAL}")
    for skip in (True, False):
        deltas, last, _ = _stream(byte_tok, ids, skip_special_tokens=skip)
        assert "".join(deltas) + last == byte_tok.decode(ids, skip_special_tokens=skip)
    assert SPECIAL in byte_tok.decode(ids, skip_special_tokens=False)


def test_leading_space_comes_from_prompt_context(metaspace_tok):
    prompt = _encode(metaspace_tok, "the quick brown")
    output = _encode(metaspace_tok, "the quick brown fox jumps over the lazy dog")[len(prompt):]
    full = metaspace_tok.decode(prompt + output)
    expected = full[len(metaspace_tok.decode(prompt)):]
    assert expected.startswith(" ") and not metaspace_tok.decode(output).startswith(" ")
    for sizes in ([1], [2, 3]):
        deltas, last, _ = _stream(metaspace_tok, output, sizes, prompt=prompt)
        assert "".join(deltas) + last == expected


def test_each_step_decodes_a_small_window(byte_tok):
    class CountingTokenizer:
        def __init__(self, inner):
            self.inner, self.lengths = inner, []

        def decode(self, ids, **kwargs):
            self.lengths.append(len(ids))
            return self.inner.decode(ids, **kwargs)

    counting = CountingTokenizer(byte_tok)
    ids = _encode(byte_tok, ENGLISH * 10)
    prompt = _encode(byte_tok, ENGLISH)
    deltas, last, _ = _stream(counting, ids, prompt=prompt, stop=["never"])
    assert "".join(deltas) + last == byte_tok.decode(ids)
    assert len(ids) > 100 and max(counting.lengths) <= 12


# ---------------------------------------------------------------- stop strings


def _spanning_stop(tok, ids: list[int]) -> tuple[str, int]:
    """A 3-character substring of decode(ids) that straddles a token boundary, and its position."""
    text, pos = tok.decode(ids), 0
    for i in ids[:-1]:
        pos += len(tok.decode([i]))
        if 2 <= pos <= len(text) - 2 and text[pos - 2:pos + 1].strip():
            stop = text[pos - 2:pos + 1]
            return stop, text.find(stop)
    raise AssertionError("no token boundary to straddle")


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("sizes", [[1], [3], [2, 5]])
def test_stop_string_spanning_tokens(byte_tok, include, sizes):
    ids = _encode(byte_tok, "hello there, the quick brown fox jumps over the lazy dog")
    stop, pos = _spanning_stop(byte_tok, ids)
    text = byte_tok.decode(ids)
    deltas, last, detok = _stream(byte_tok, ids, sizes, stop=[stop], include_stop_str_in_output=include)
    expected = text[:pos + len(stop)] if include else text[:pos]
    assert detok.output_text == expected == "".join(deltas) + last
    assert detok.stop_string == stop and last == ""


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(ALPHABET[:-1]), min_size=1, max_size=30),
    data=st.data(),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    include=st.booleans(),
)
def test_streamed_deltas_never_pass_the_stop(byte_tok, pieces, data, sizes, include):
    ids = _encode(byte_tok, "".join(pieces))
    text = byte_tok.decode(ids)
    start = data.draw(st.integers(0, len(text) - 1))
    stop = data.draw(st.sampled_from([text[start:start + n] for n in (1, 2, 4, 6)] + ["zz"]))
    expected = _first_stop_cut(text, stop, include)
    detok = IncrementalDetokenizer(byte_tok, [], stop=[stop], include_stop_str_in_output=include)
    streamed = ""
    for chunk in _chunks(ids, sizes):
        update = detok.update(chunk)
        streamed += update.delta
        assert expected.startswith(streamed)  # nothing shown that a stop later cuts
        if update.stop_string is not None:
            assert update.stop_string == stop
            break
    streamed += detok.finish()
    assert streamed == expected == detok.output_text
    assert (detok.stop_string == stop) == (stop in text)


def test_lookahead_is_exactly_longest_stop_minus_one(byte_tok):
    ids = _encode(byte_tok, "hello world, hello there")
    detok = IncrementalDetokenizer(byte_tok, [], stop=["xyz", "never!"])
    streamed = ""
    for n, i in enumerate(ids, 1):
        streamed += detok.update([i]).delta
        assert streamed == byte_tok.decode(ids[:n])[:-5]
    assert streamed + detok.finish() == byte_tok.decode(ids)
    assert detok.stop_string is None


def test_stop_prefix_held_then_released_by_finish(byte_tok):
    ids = _encode(byte_tok, "hello wor")
    deltas, last, detok = _stream(byte_tok, ids, stop=["world"])
    assert "".join(deltas) == "hello" and last == " wor"
    assert detok.output_text == "hello wor" and detok.stop_string is None


def test_earliest_of_several_stops_wins(byte_tok):
    ids = _encode(byte_tok, "hello world, the quick brown fox")
    # All at once: both stops complete in the same update; the one earlier in the text wins.
    for stops in (["quick", "world"], ["world", "quick"]):
        _, _, detok = _stream(byte_tok, ids, [len(ids)], stop=stops)
        assert detok.output_text == "hello " and detok.stop_string == "world"
    # Same start: the shorter stop ends first.
    _, _, detok = _stream(byte_tok, ids, [len(ids)], stop=["world, the", "wor"], include_stop_str_in_output=True)
    assert detok.output_text == "hello wor"
    # Token by token: the stop that completes first wins.
    _, _, detok = _stream(byte_tok, ids, [1], stop=["brown", "llo"])
    assert detok.output_text == "he" and detok.stop_string == "llo"


def test_stop_in_prompt_is_ignored(byte_tok):
    prompt = _encode(byte_tok, "say hello")
    ids = _encode(byte_tok, " there, the lazy dog")
    deltas, last, detok = _stream(byte_tok, ids, prompt=prompt, stop=["hello"])
    assert "".join(deltas) + last == byte_tok.decode(ids) and detok.stop_string is None


def test_stop_after_multibyte_characters(byte_tok):
    ids = _encode(byte_tok, "héllo 日本語 🙂 wörld")
    for stop, expected in (("本", "héllo 日"), ("🙂 w", "héllo 日本語 "), ("ö", "héllo 日本語 🙂 w")):
        deltas, last, detok = _stream(byte_tok, ids, [1], stop=[stop, "zzzzzz"])
        assert "".join(deltas) + last == expected == detok.output_text
        assert detok.stop_string == stop


def test_random_texts_with_stops_match_reference(byte_tok):
    rng = random.Random(0)
    for _ in range(100):
        text = "".join(rng.choice(ALPHABET[:-1]) for _ in range(rng.randint(1, 30)))
        ids = _encode(byte_tok, text)
        stop = rng.choice(["l", "lo", " w", "日本", "🙂", "o,", "\n"])
        include = rng.random() < 0.5
        deltas, last, _ = _stream(byte_tok, ids, [rng.randint(1, 4)], stop=[stop],
                                  include_stop_str_in_output=include)
        assert "".join(deltas) + last == _first_stop_cut(byte_tok.decode(ids), stop, include)


# ---------------------------------------------------------------- misuse


def test_empty_stop_string_rejected(byte_tok):
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(byte_tok, [], stop=["ok", ""])


def test_update_after_stop_raises(byte_tok):
    detok = IncrementalDetokenizer(byte_tok, [], stop=["o"])
    assert detok.update(_encode(byte_tok, "hello")).stop_string == "o"
    assert detok.finish() == ""
    with pytest.raises(RuntimeError):
        detok.update([1])


@settings(max_examples=100, deadline=None)
@given(pieces=st.lists(st.sampled_from(list("abcdehlorw .,!")), min_size=2, max_size=30), data=st.data())
def test_stops_before_min_tokens_never_match(byte_tok, pieces, data):
    """vLLM's rule: a stop string counts only if it ends in text of a token after the min_tokens-th."""
    ids = _encode(byte_tok, "".join(pieces))
    text = byte_tok.decode(ids)
    min_tokens = data.draw(st.integers(0, len(ids)))
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start:start + data.draw(st.integers(1, 4))]
    boundary = len(byte_tok.decode(ids[:min_tokens]))  # ASCII only: every token's text is complete
    found = text.find(stop, max(boundary - len(stop) + 1, 0))
    expected = text if found < 0 else text[:found]
    detok = IncrementalDetokenizer(byte_tok, [], stop=[stop])
    for n, i in enumerate(ids, 1):
        if detok.update([i], check_stops=n > min_tokens).stop_string is not None:
            break
    detok.finish()
    assert detok.output_text == expected
    assert (detok.stop_string == stop) == (found >= 0)
