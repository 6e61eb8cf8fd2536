"""Experiment configs: each module defines ``get_config() -> loopjax.train.experiment.Experiment``."""
