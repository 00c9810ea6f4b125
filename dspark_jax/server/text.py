"""Incremental detokenisation for streaming, with OpenAI `stop` strings.

Text is decoded from all tokens so far (so multi-token characters and word boundaries come out right) and
released in deltas. A delta never ends inside an incomplete character (U+FFFD at the end is held back) or in a
prefix of a stop string that the next tokens may complete; when a stop string appears the text ends right
before it (the stop string is never returned) and `stopped` is set.
"""
from __future__ import annotations

from typing import Sequence


class TextStream:
    """Feed token ids with `push`; each call returns the new text that is safe to emit."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned
        self.stopped = False
        self._text = ""

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that may still become (part of) a stop string or a character."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        if text.endswith("\ufffd"):
            hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
        return hold

    def push(self, token: int) -> str:
        """The text released by one more token ('' after a stop string)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        self._text = self.tokenizer.decode(self.ids)
        search_from = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (self._text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            end = max(min(hits), self.emitted)
            delta, self.emitted = self._text[self.emitted:end], end
            return delta
        end = max(len(self._text) - self._held_back(self._text), self.emitted)
        delta, self.emitted = self._text[self.emitted:end], end
        return delta

    def finish(self) -> str:
        """The held-back rest at the end of generation (nothing after a stop string)."""
        if self.stopped:
            return ""
        delta, self.emitted = self._text[self.emitted:], len(self._text)
        return delta
