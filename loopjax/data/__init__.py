"""Input data: grain pipelines, a byte-level text source, prepared token corpora (``prepare``, ``tokens``), synthetic
reasoning tasks (``loopjax.data.tasks``)."""

from loopjax.data import tasks, text
from loopjax.data.pipeline import make_pipeline, shard_bounds
from loopjax.data.tasks import IGSM, Addition, FactTable, Mixture, PHop, TaskSource, answer_correct
from loopjax.data.text import ByteTextSource
from loopjax.data.tokens import PackedTokenSource

__all__ = ["Addition", "ByteTextSource", "FactTable", "IGSM", "Mixture", "PHop", "PackedTokenSource", "TaskSource",
           "answer_correct", "make_pipeline", "shard_bounds", "tasks", "text"]
