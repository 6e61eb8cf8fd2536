"""Training: train state, optimizer, jitted train / eval steps, the ``Trainer`` loop, metric output."""

from loopjax.train.metrics import MetricWriter, device_peak_flops
from loopjax.train.optim import make_optimizer, make_schedule
from loopjax.train.state import TrainState, abstract_target, model_graphdef, state_builder
from loopjax.train.tasks import EVAL_SEED, TaskScore, accuracy_vs_loops, fit_on_task, task_accuracy
from loopjax.train.step import loop_losses, make_eval_step, make_train_step, objective_loss
from loopjax.train.trainer import FitResult, NonFiniteError, Trainer

__all__ = ["EVAL_SEED", "FitResult", "TaskScore", "accuracy_vs_loops", "fit_on_task", "task_accuracy", "MetricWriter", "NonFiniteError", "TrainState", "Trainer", "abstract_target",
           "device_peak_flops", "loop_losses", "make_eval_step", "make_optimizer", "make_schedule",
           "make_train_step", "model_graphdef", "objective_loss", "state_builder"]
