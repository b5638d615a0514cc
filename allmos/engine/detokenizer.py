"""Incremental detokenization of a request's output, with stop strings.

Invariant: every delta is final. The concatenation of the deltas returned by `update()` and
`finish()` is always a prefix of the final text, which is the decoded output ids (decoded in the
context of the prompt's last tokens, so leading spaces come out as they would in
`tokenizer.decode(prompt_ids + output_ids)`), cut at the first stop string. Two kinds of text are
held back until they are final:

* the trailing U+FFFD of a character whose bytes are split over tokens not all generated yet;
* the last ``len(longest stop) - 1`` characters, which a stop string completed by later tokens
  could still cut.

Each step decodes only a small window of ids (``prefix_offset:``), so its cost does not grow with
the length of the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded in front of the output, so the first output token gets its context.
_NUM_CONTEXT_TOKENS = 5


@dataclass(frozen=True)
class DetokenizerUpdate:
    """What one `IncrementalDetokenizer.update()` produced."""

    delta: str  # new text safe to show the user now
    stop_string: str | None = None  # the stop string matched by this update (the request must finish)


class _WindowDecoder:
    """Turns a growing id list into text by decoding the window ``ids[prefix_offset:]``.

    The text of ``ids[prefix_offset:read_offset]`` (``prefix_text``) was already returned; the
    window's text past it, minus the first ``num_consumed`` characters already returned, is new.
    """

    def __init__(self, tokenizer, context_ids: Sequence[int], skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        ids = list(context_ids[max(len(context_ids) - _NUM_CONTEXT_TOKENS, 0):])
        prefix_text = self._decode(ids)
        if prefix_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: its context would swallow the output's first bytes.
            ids, prefix_text = [], ""
        self._ids = ids
        self._prefix_offset = 0
        self._read_offset = len(ids)
        self._prefix_text = prefix_text
        self._num_consumed = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def step(self, new_ids: Sequence[int], *, final: bool) -> str:
        """Append `new_ids` and return the text that became final. With `final`, flush everything."""
        self._ids.extend(new_ids)
        text = self._decode(self._ids[self._prefix_offset:])
        complete = final or not text.endswith(_REPLACEMENT_CHAR)
        stable_end = len(text) if complete else len(text.rstrip(_REPLACEMENT_CHAR))
        delta = text[len(self._prefix_text) + self._num_consumed:stable_end]
        if complete and len(text) > len(self._prefix_text):
            self._advance()
        else:
            self._num_consumed += len(delta)
        return delta

    def _advance(self) -> None:
        """Slide the window: everything read so far becomes the context of the next step."""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        self._num_consumed = 0


class _StopStringMatcher:
    """Finds the first stop string in a stream of text and holds back what a stop could still cut.

    ``pending`` is the text received but not released; it never holds more than
    ``len(longest stop) - 1`` characters between calls, and every match that can still complete
    starts inside it.
    """

    def __init__(self, stops: Sequence[str], include_stop_str_in_output: bool):
        self._stops = tuple(stops)
        self._include_stop = include_stop_str_in_output
        self._num_held = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self._unsearched = 0  # pending[:_unsearched] came in while stops were off: no match may end there

    def feed(self, text: str, *, final: bool, search: bool = True) -> tuple[str, str | None]:
        """Add `text`; return (text released now, matched stop or None). After a match, stop feeding.

        With ``search=False`` (``min_tokens`` not reached yet) no stop can match; text fed then can still
        start a stop string that ends in text fed later, as in vLLM."""
        self._pending += text
        match = self._earliest_match() if search else None
        if match is not None:
            start, stop = match
            end = start + len(stop) if self._include_stop else start
            released, self._pending = self._pending[:end], ""
            return released, stop
        self._unsearched = 0 if search else len(self._pending)
        cut = len(self._pending) if final else max(len(self._pending) - self._num_held, 0)
        released, self._pending = self._pending[:cut], self._pending[cut:]
        self._unsearched = max(self._unsearched - cut, 0)
        return released, None

    def _earliest_match(self) -> tuple[int, str] | None:
        """The match that starts first in the pending text and ends in searchable text; on a tie, the
        shorter stop (it ends first)."""
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = self._pending.find(stop, max(self._unsearched - len(stop) + 1, 0))
            if start >= 0 and (best is None or (start, len(stop)) < best[:2]):
                best = (start, len(stop), stop)
        return None if best is None else (best[0], best[2])


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text, one step at a time.

    Call `update()` with each step's new ids, then `finish()` once the request ends for any
    reason other than a stop string (EOS, length, abort) to flush the text still held back.
    Stop strings are matched on the output text only, across token boundaries; on a match the
    output ends right before the stop string (right after it with `include_stop_str_in_output`).
    """

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ):
        stops = [stop] if isinstance(stop, str) else list(stop)
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop: every stop string must be a non-empty str, got {stops!r}")
        self._decoder = _WindowDecoder(tokenizer, prompt_token_ids, skip_special_tokens)
        self._matcher = _StopStringMatcher(stops, include_stop_str_in_output)
        self._parts: list[str] = []
        self._finished = False
        self._stop_string: str | None = None

    def update(self, new_token_ids: list[int], *, check_stops: bool = True) -> DetokenizerUpdate:
        """Add this step's output ids; return the text now final and the stop string matched, if any.

        ``check_stops=False`` while the request is below ``min_tokens``: a stop string must end in text
        of a later update to count."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.update() called after the output finished")
        if not new_token_ids:
            return DetokenizerUpdate("")
        return self._release(self._decoder.step(new_token_ids, final=False), final=False, search=check_stops)

    def finish(self) -> str:
        """Flush the held-back text (stop lookahead, incomplete character); return the last delta.

        A stop string can still match in the flushed text (see `stop_string`). Idempotent.
        """
        if self._finished:
            return ""
        return self._release(self._decoder.step([], final=True), final=True).delta

    def _release(self, text: str, *, final: bool, search: bool = True) -> DetokenizerUpdate:
        delta, stop = self._matcher.feed(text, final=final, search=search)
        self._parts.append(delta)
        if stop is not None or final:
            self._finished = True
            self._stop_string = stop
        return DetokenizerUpdate(delta, stop)

    @property
    def output_text(self) -> str:
        """The text emitted so far (the final text once finished)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._stop_string

    @property
    def is_finished(self) -> bool:
        """True once a stop string matched or `finish()` was called."""
        return self._finished
