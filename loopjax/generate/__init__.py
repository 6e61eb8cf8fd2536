"""Generation with a KV cache across loop steps: prefill, decode step, sampling, early-exit decoding.

``loopjax.generate`` (the function exported by ``loopjax``) is ``loopjax.generate.loop.generate``.
"""

from loopjax.generate.cache import KV_MODES, KVCache, init_cache
from loopjax.generate.loop import GenerateOutput, decode_step, generate, prefill
from loopjax.generate.sampling import Sampling, sample
from loopjax.generate.text import TextGeneration, generate_text, load_tokenizer

__all__ = ["KV_MODES", "GenerateOutput", "KVCache", "Sampling", "TextGeneration", "decode_step", "generate",
           "generate_text", "init_cache", "load_tokenizer", "prefill", "sample"]
