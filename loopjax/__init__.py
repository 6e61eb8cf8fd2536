"""loopjax: looped (recurrent-depth) language models in JAX / Flax NNX."""

from loopjax.config import HaltingConfig, LoopedConfig, ouro_1_4b, ouro_2_6b, tiny
from loopjax.flops import forward_flops, train_flops
from loopjax.halting import (ACTExit, ConvergenceExit, FixedExit, QExit, act_loss, chunked_step_cross_entropy,
                             exit_cdf, exit_distribution, final_step_loss, halting_loss, mixture_logits,
                             mixture_logits_loss, ouro_expected_loss, ouro_gate_loss, pondernet_loss,
                             sample_loop_count, step_cross_entropy)
from loopjax.looped import LoopedCore
from loopjax.model import LoopedLM, LoopedOutput, count_params
from loopjax.config import MeshConfig
from loopjax.sharding import make_mesh
from loopjax import data  # cheap: grain is imported only when a pipeline is built
from loopjax import analysis  # cheap: matplotlib is imported only when a plot is drawn
from loopjax.config import TrainConfig
from loopjax import train  # lj.train.Trainer
# last, so that `lj.generate` is the function; import submodules with `from loopjax.generate.x import y`
from loopjax.generate import GenerateOutput, KVCache, Sampling, TextGeneration, generate, generate_text
from loopjax.convert import load_ouro, save_ouro

__version__ = "0.1.0"

__all__ = [
    "LoopedConfig", "LoopedCore", "LoopedLM", "LoopedOutput", "count_params", "exit_distribution",
    "forward_flops", "ouro_1_4b",
    "HaltingConfig", "FixedExit", "QExit", "ACTExit", "ConvergenceExit", "act_loss", "chunked_step_cross_entropy",
    "exit_cdf", "final_step_loss", "halting_loss", "mixture_logits", "mixture_logits_loss", "ouro_expected_loss",
    "ouro_gate_loss", "pondernet_loss", "sample_loop_count", "step_cross_entropy", "ouro_2_6b", "tiny", "train_flops",
    "GenerateOutput", "KVCache", "Sampling", "TextGeneration", "generate", "generate_text",
    "load_ouro", "save_ouro",
    "MeshConfig", "make_mesh",
    "TrainConfig", "train",
]
