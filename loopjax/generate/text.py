"""Text in, text out: ``generate_text`` wraps ``generate`` with a tokenizer, or UTF-8 bytes when there is none."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from loopjax.generate.loop import generate


@dataclasses.dataclass(frozen=True)
class TextGeneration:
    """One prompt's continuation.

    text: the new text (stop token excluded); token_ids / token_texts: each new token and its own decoded piece
    (for annotating tokens by depth); exit_steps: the loop (1..T) each token was read out from;
    n_iterations: loop iterations executed for the whole call; stopped: a stop token ended it.
    """

    text: str
    token_ids: list[int]
    token_texts: list[str]
    exit_steps: list[int]
    n_iterations: int
    stopped: bool


def load_tokenizer(path: str) -> Any:
    """A ``tokenizers.Tokenizer`` from a local ``tokenizer.json``."""
    try:
        from tokenizers import Tokenizer
    except ImportError as err:  # optional dependency
        raise ImportError("loading tokenizer.json needs the `tokenizers` package: pip install tokenizers") from err
    return Tokenizer.from_file(str(path))


def encode(text: str, tokenizer: Any, vocab_size: int) -> list[int]:
    """Token ids of ``text``: ``tokenizer.encode`` (a ``tokenizers.Tokenizer`` or any encode returning ids), or
    its UTF-8 bytes without a tokenizer (needs vocab_size >= 256)."""
    if tokenizer is None:
        if vocab_size < 256:
            raise ValueError(f"vocab_size={vocab_size}: byte-level text needs a vocabulary of at least 256; "
                             "pass a tokenizer")
        return list(text.encode("utf-8"))
    ids = tokenizer.encode(text)
    return list(getattr(ids, "ids", ids))


def decode(ids: list[int], tokenizer: Any) -> str:
    """Text of token ids (bytes mode: ids >= 256 become U+FFFD)."""
    if tokenizer is None:
        return b"".join(bytes([i]) if i < 256 else "\ufffd".encode() for i in ids).decode("utf-8", errors="replace")
    return tokenizer.decode(list(ids))


def generate_text(model, prompt: str, tokenizer: Any = None, max_new_tokens: int = 64, *,
                  stop_tokens: list[int] | int | None = None, **generate_kwargs: Any) -> TextGeneration:
    """Continue ``prompt`` with ``generate`` (greedy by default; ``generate_kwargs`` pass exit_rule, kv_mode,
    sampling, seed, n_loops, ...). Without a tokenizer, text is UTF-8 bytes (token id = byte value)."""
    ids = encode(prompt, tokenizer, model.cfg.vocab_size)
    out = generate(model, np.asarray([ids], np.int32), max_new_tokens, stop_tokens=stop_tokens, **generate_kwargs)
    n = int(out.lengths[0])
    new = [int(i) for i in np.asarray(out.tokens[0, :n])]
    stops = {stop_tokens} if isinstance(stop_tokens, int) else set(stop_tokens or ())
    stopped = bool(new) and new[-1] in stops
    shown = new[:-1] if stopped else new
    return TextGeneration(text=decode(shown, tokenizer), token_ids=new,
                          token_texts=[decode([i], tokenizer) for i in new],
                          exit_steps=[int(e) for e in np.asarray(out.exit_steps[0, :n])],
                          n_iterations=out.total_iterations(), stopped=stopped)
