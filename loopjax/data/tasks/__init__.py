"""Synthetic reasoning tasks as deterministic grain sources: p-hop induction, n-ary addition, i-GSM-style problems,
associative recall."""

from loopjax.data.tasks.addition import Addition
from loopjax.data.tasks.base import Example, Task, TaskSource, answer_correct, lm_arrays
from loopjax.data.tasks.igsm import IGSM
from loopjax.data.tasks.phop import PHop
from loopjax.data.tasks.recall import Recall

__all__ = ["Addition", "Example", "IGSM", "PHop", "Recall", "Task", "TaskSource", "answer_correct", "lm_arrays"]
