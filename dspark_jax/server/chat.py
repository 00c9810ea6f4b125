"""Chat messages → prompt token ids with the model's chat template.

Gemma 3's turn format (the embedded target's): `<bos><start_of_turn>user\n{system}\n\n{text}<end_of_turn>\n
<start_of_turn>model\n{text}<end_of_turn>\n … <start_of_turn>model\n` — a system message joins the first user
turn (Gemma has no system role), "assistant" turns are "model" turns. The turn markers are inserted as token ids;
message text is encoded as plain text, so a message that contains "<start_of_turn>" cannot open a turn.
A model whose tokenizer has no turn markers (a base model) has no chat template: `/v1/chat/completions`
answers 400 and `/v1/completions` serves raw text.
"""
from __future__ import annotations

from typing import Sequence

START, END = "<start_of_turn>", "<end_of_turn>"


class NoChatTemplate(ValueError):
    """The model's tokenizer has no chat turn markers."""


def _single_id(tokenizer, piece: str) -> int | None:
    try:
        ids = tokenizer.encode(piece, add_bos=False)
    except Exception:  # noqa: BLE001 -- a tokenizer that cannot encode the marker has no template
        return None
    return ids[0] if len(ids) == 1 else None


def turn_marker_ids(tokenizer) -> tuple[int, int]:
    """(start_of_turn, end_of_turn) ids; raises NoChatTemplate when the tokenizer lacks them."""
    start, end = _single_id(tokenizer, START), _single_id(tokenizer, END)
    if start is None or end is None:
        raise NoChatTemplate("this model has no chat template (its tokenizer has no <start_of_turn>/<end_of_turn> "
                             "tokens): use /v1/completions with a raw prompt")
    return start, end


def render_chat(tokenizer, messages: Sequence[tuple[str, str]]) -> list[int]:
    """Prompt ids for (role, text) messages, roles system | user | assistant (validated upstream), ending with an
    open model turn. Raises NoChatTemplate, or ValueError when no user or assistant message is given."""
    start, end = turn_marker_ids(tokenizer)
    system = "\n\n".join(text for role, text in messages if role == "system")
    turns = [(role, text) for role, text in messages if role != "system"]
    if not turns:
        raise ValueError("messages must contain a user message")
    if system:
        if turns[0][0] == "user":
            turns[0] = ("user", f"{system}\n\n{turns[0][1]}")
        else:
            turns.insert(0, ("user", system))
    ids = tokenizer.encode("", add_bos=True)
    for role, text in turns:
        ids += [start] + tokenizer.encode(f"{'model' if role == 'assistant' else 'user'}\n{text}", add_bos=False)
        ids += [end] + tokenizer.encode("\n", add_bos=False)
    return ids + [start] + tokenizer.encode("model\n", add_bos=False)
