"""Generation with a KV cache across loop steps: prefill, decode step, sampling, early-exit decoding.

``loopjax.generate`` (the function exported by ``loopjax``) is ``loopjax.generate.loop.generate``.
"""

from loopjax.generate.cache import KV_MODES, KVCache, init_cache
from loopjax.generate.loop import GenerateOutput, decode_step, generate, prefill
from loopjax.generate.sampling import Sampling, sample

__all__ = ["KV_MODES", "GenerateOutput", "KVCache", "Sampling", "decode_step", "generate", "init_cache", "prefill",
           "sample"]
