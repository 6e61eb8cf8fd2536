"""loopjax: looped (recurrent-depth) language models in JAX / Flax NNX."""

from loopjax.config import LoopedConfig, ouro_1_4b, ouro_2_6b, tiny
from loopjax.flops import forward_flops, train_flops
from loopjax.halting import exit_distribution
from loopjax.looped import LoopedCore
from loopjax.model import LoopedLM, LoopedOutput, count_params
from loopjax import data  # cheap: grain is imported only when a pipeline is built

__version__ = "0.1.0"

__all__ = [
    "LoopedConfig", "LoopedCore", "LoopedLM", "LoopedOutput", "count_params", "exit_distribution",
    "forward_flops", "ouro_1_4b", "ouro_2_6b", "tiny", "train_flops",
]
