"""The evaluation tokenizer: an HF ``tokenizer.json`` (Ouro folders, prepared corpora) or UTF-8 bytes."""

from __future__ import annotations

import dataclasses

from loopjax.data.prepare import CorpusTokenizer, load_corpus_tokenizer


@dataclasses.dataclass
class EvalTokenizer:
    """Text <-> ids for the harness.

    eot_id: ends a generation (the tokenizer's EOS, else its BOS); prefix_id: the context of an empty-context
    request (BOS when there is one, else EOT). Bytes: ids 0..255 are the bytes, BOS 256, EOS 257 (as
    ``loopjax.data.text`` and ``loopjax data prepare --tokenizer bytes`` lay them out).
    """

    corpus: CorpusTokenizer

    def __post_init__(self) -> None:
        if self.corpus.eos_id is None and self.corpus.bos_id is None:
            raise ValueError(f"tokenizer {self.corpus.path}: names neither an EOS nor a BOS token (a "
                             "tokenizer_config.json with eos_token beside tokenizer.json), so generations cannot "
                             "end and empty contexts have no prefix")

    @property
    def vocab_size(self) -> int:
        return self.corpus.vocab_size

    @property
    def eot_id(self) -> int:
        return self.corpus.eos_id if self.corpus.eos_id is not None else self.corpus.bos_id

    @property
    def prefix_id(self) -> int:
        return self.corpus.bos_id if self.corpus.bos_id is not None else self.eot_id

    @property
    def kind(self) -> str:
        return self.corpus.kind

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, no special tokens added."""
        ids, _ = self.corpus.encode_batch([text])
        return [int(i) for i in ids]

    def decode(self, ids) -> str:
        """Text of ``ids`` (BOS / EOS dropped)."""
        return self.corpus.decode(ids)

    def check_model(self, vocab_size: int) -> None:
        """ValueError when the model's vocabulary cannot hold every id of this tokenizer."""
        if self.vocab_size > vocab_size:
            what = "bytes (ids 0..257)" if self.kind == "bytes" else self.corpus.path
            raise ValueError(f"tokenizer {what}: has {self.vocab_size} ids but the model's vocab_size is "
                             f"{vocab_size}; evaluate with the tokenizer the model was trained with "
                             "(--tokenizer TOKENIZER_JSON | DIR | bytes)")


def load_eval_tokenizer(spec: str) -> EvalTokenizer:
    """``spec``: "bytes", a tokenizer.json, or a folder holding one (an Ouro folder, a prepared corpus)."""
    return EvalTokenizer(load_corpus_tokenizer(spec))
