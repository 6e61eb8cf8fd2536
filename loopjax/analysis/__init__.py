"""Analysis of looped models: trajectory recording, fixed-point and attention metrics, contraction, accuracy per
FLOP, a one-call report (``analyze``), and plots (``loopjax.analysis.plots`` imports matplotlib only when drawing)."""

from loopjax.analysis.efficiency import (EvalPoint, evaluate_models, evaluate_rules, exit_rule_grid, pareto_frontier,
                                         pareto_mask, points_table, rule_name)
from loopjax.analysis.fixed_points import (attention_change, convergence_rate, cyclic_score, fixed_point_distances,
                                           js_divergence, layer_convergence, logit_lens, loop_contraction,
                                           spectral_norm, step_change, token_mean, total_variation)
from loopjax.analysis.trajectory import Trajectory, loop_map, record
from loopjax.analysis.report import analyze
from loopjax.analysis import plots

__all__ = [
    "EvalPoint", "Trajectory", "analyze", "attention_change", "convergence_rate", "cyclic_score", "evaluate_models",
    "evaluate_rules", "exit_rule_grid", "fixed_point_distances", "js_divergence", "layer_convergence",
    "logit_lens", "loop_contraction", "loop_map", "pareto_frontier", "pareto_mask", "plots", "points_table",
    "record", "rule_name", "spectral_norm", "step_change", "token_mean", "total_variation",
]
