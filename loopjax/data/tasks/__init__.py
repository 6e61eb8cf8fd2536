"""Synthetic reasoning tasks as deterministic grain sources: p-hop induction, n-ary addition, i-GSM-style problems,
associative recall, fact-table recall, and mixtures of them in one vocabulary."""

from loopjax.data.tasks.addition import Addition
from loopjax.data.tasks.base import Example, Task, TaskSource, answer_correct, lm_arrays
from loopjax.data.tasks.facts import FactTable
from loopjax.data.tasks.igsm import IGSM
from loopjax.data.tasks.mixture import Mixture
from loopjax.data.tasks.phop import PHop
from loopjax.data.tasks.recall import Recall

__all__ = ["Addition", "Example", "FactTable", "IGSM", "Mixture", "PHop", "Recall", "Task", "TaskSource",
           "answer_correct", "lm_arrays"]
