"""lm-evaluation-harness backend: every loop depth from one pass, FLOPs per token, ``loopjax lm-eval``.

Names load lazily, so the CLI's parser stays light; ``LoopjaxLM`` needs the ``eval`` extra (lm-eval), and
``from loopjax.evaluation import LoopjaxLM`` is where a missing install shows.
"""

import importlib

_NAMES = {"ADAPTIVE": "depths", "FROZEN": "depths", "parse_depths": "depths", "Scorer": "scoring",
          "TokenRequest": "scoring", "length_buckets": "scoring", "truncate": "scoring",
          "EvalTokenizer": "tokenizer", "load_eval_tokenizer": "tokenizer", "LoopjaxLM": "harness",
          "load_for_eval": "load", "evaluate_depths": "run"}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f"loopjax.evaluation.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'loopjax.evaluation' has no attribute {name!r}")
