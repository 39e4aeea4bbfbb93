"""A1111's prompt reading (sdrt.prompts): emphasis weights against the table in A1111's documentation
of parse_prompt_attention, BREAK, and the 75-token chunks with A1111's comma backtrack."""

from __future__ import annotations

import pytest

from sdrt.prompts import BREAK, CHUNK_TOKENS, Chunk, chunk_rows, chunk_tokens, parse_emphasis

# A1111's documented examples (modules/prompt_parser.py, parse_prompt_attention), weights to 1e-12
A1111_TABLE = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
]
MORE = [
    ("", [("", 1.0)]),
    ("(red:1.0)", [("red", 1.0)]),
    ("[[a]] b", [("a", 1 / 1.1 ** 2), (" b", 1.0)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a: 1.5 )", [("a", 1.5)]),
    ("a:b", [("a:b", 1.0)]),  # a colon that closes nothing is text
    ("(a:b)", [("a:b", 1.1)]),  # ... and the `)` then closes with 1.1
    ("a) b]", [("a) b]", 1.0)]),  # unopened closing brackets are text
    ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # not a number: text (A1111 raises)
    ("\\\\ back", [("\\ back", 1.0)]),
    ("((a)[b])", [("a", 1.21), ("b", 1.0)]),
]


def assert_pieces(got, expected):
    assert len(got) == len(expected), got
    for g, e in zip(got, expected):
        if e is BREAK:
            assert g is BREAK
            continue
        assert g[0] == e[0]
        assert g[1] == pytest.approx(e[1], rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("prompt,expected", A1111_TABLE + MORE)
def test_emphasis_weights_as_a1111_computes_them(prompt, expected):
    assert_pieces(parse_emphasis(prompt), expected)


@pytest.mark.parametrize("prompt,expected", [
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("BREAK a", [BREAK, ("a", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), BREAK, BREAK, ("b", 1.0)]),
    ("(x BREAK y)", [("x", 1.1), BREAK, ("y", 1.1)]),  # A1111 weights the word BREAK here instead
    ("a break b, BREAKING", [("a break b, BREAKING", 1.0)]),  # upper case, a word of its own
])
def test_break_markers(prompt, expected):
    assert_pieces(parse_emphasis(prompt), expected)


def ids_of(chunks):
    return [list(c.ids) for c in chunks]


COMMA = 9


def test_chunks_of_75_and_at_least_one():
    assert ids_of(chunk_tokens([([], 1.0)], COMMA)) == [[]]
    assert ids_of(chunk_tokens([], COMMA)) == [[]]
    tokens = list(range(100, 100 + 160))
    chunks = chunk_tokens([(tokens, 1.3)], COMMA)
    assert ids_of(chunks) == [tokens[:75], tokens[75:150], tokens[150:]]
    assert all(w == 1.3 for c in chunks for w in c.weights)
    assert ids_of(chunk_tokens([(tokens[:75], 1.0)], COMMA)) == [tokens[:75]]  # exactly full: one chunk


def test_weights_follow_their_tokens_across_pieces():
    chunks = chunk_tokens([([1, 2], 1.0), ([3], 1.5), ([4, 5], 0.5)], COMMA)
    assert chunks == [Chunk((1, 2, 3, 4, 5), (1.0, 1.0, 1.5, 0.5, 0.5))]


def test_break_closes_the_chunk():
    chunks = chunk_tokens([([1, 2], 1.0), BREAK, ([3], 1.0)], COMMA)
    assert ids_of(chunks) == [[1, 2], [3]]
    assert ids_of(chunk_tokens([BREAK, ([3], 1.0)], COMMA)) == [[], [3]]  # as A1111: an empty first chunk
    assert ids_of(chunk_tokens([([3], 1.0), BREAK], COMMA)) == [[3]]


def test_comma_backtrack_moves_the_words_after_the_last_comma():
    # a comma at index 60 of a full chunk: 15 tokens after it (<= 20) move on
    tokens = list(range(100, 160)) + [COMMA] + list(range(200, 230))
    chunks = chunk_tokens([(tokens, 1.0)], COMMA)
    assert ids_of(chunks) == [tokens[:61], tokens[61:]]
    # a comma 25 tokens before the end (> 20): a plain cut at 75
    tokens = list(range(100, 150)) + [COMMA] + list(range(200, 240))
    assert ids_of(chunk_tokens([(tokens, 1.0)], COMMA)) == [tokens[:75], tokens[75:]]
    # backtrack 0 turns it off
    tokens = list(range(100, 160)) + [COMMA] + list(range(200, 230))
    assert ids_of(chunk_tokens([(tokens, 1.0)], COMMA, backtrack=0)) == [tokens[:75], tokens[75:]]


def test_a_comma_that_would_be_the_76th_token_opens_the_next_chunk():
    tokens = list(range(100, 175)) + [COMMA, 300]
    assert ids_of(chunk_tokens([(tokens, 1.0)], COMMA)) == [tokens[:75], [COMMA, 300]]


def test_weights_move_with_backtracked_tokens():
    tokens = list(range(100, 160)) + [COMMA] + list(range(200, 230))
    chunks = chunk_tokens([(tokens[:61], 1.0), (tokens[61:], 2.0)], COMMA)
    assert chunks[1].weights == (2.0,) * 30 and set(chunks[0].weights) == {1.0}


def test_chunk_rows_wrap_pad_and_add_empty_chunks():
    rows = list(chunk_rows([Chunk((5, 6), (1.5, 1.0))], 2, bos=1, eos=2, pad=0))
    ids, weights = rows[0]
    assert len(ids) == len(weights) == CHUNK_TOKENS + 2
    assert ids[:5] == [1, 5, 6, 2, 0] and set(ids[5:]) == {0}
    assert weights[:3] == [1.0, 1.5, 1.0] and set(weights[3:]) == {1.0}
    assert rows[1] == ([1, 2] + [0] * 75, [1.0] * 77)  # an empty chunk: the encoding of ""
