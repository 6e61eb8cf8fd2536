"""loopjax: looped (recurrent-depth) language models in JAX / Flax NNX."""

from loopjax import analysis  # cheap: matplotlib is imported only when a plot is drawn
from loopjax import data  # cheap: grain is imported only when a pipeline is built
from loopjax import train  # lj.train.Trainer
from loopjax.config import (HaltingConfig, LoopedConfig, MeshConfig, TrainConfig, frey_200m, ouro_1_4b,
                            ouro_2_6b, tiny)
from loopjax.convert import load_ouro, save_ouro
from loopjax.flops import forward_flops, train_flops
from loopjax.halting import (ACTExit, ConvergenceExit, FixedExit, QExit, act_loss, chunked_step_cross_entropy,
                             exit_cdf, exit_distribution, expected_loss_terms, final_step_loss,
                             fused_step_cross_entropy, halting_loss, mixture_logits,
                             mixture_logits_loss, ouro_expected_loss, ouro_gate_loss, pondernet_loss,
                             sample_loop_count, step_cross_entropy)
from loopjax.looped import LoopedCore
from loopjax.model import LoopedLM, LoopedOutput, count_params
from loopjax.sharding import make_mesh

# last, so that `lj.generate` is the function; import submodules with `from loopjax.generate.x import y`
from loopjax.generate import GenerateOutput, KVCache, Sampling, TextGeneration, generate, generate_text  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ACTExit", "ConvergenceExit", "FixedExit", "GenerateOutput", "HaltingConfig", "KVCache", "LoopedConfig",
    "LoopedCore", "LoopedLM", "LoopedOutput", "MeshConfig", "QExit", "Sampling", "TextGeneration", "TrainConfig",
    "act_loss", "analysis", "chunked_step_cross_entropy", "count_params", "data", "exit_cdf", "exit_distribution",
    "expected_loss_terms", "final_step_loss", "forward_flops", "frey_200m", "fused_step_cross_entropy", "generate",
    "generate_text", "halting_loss", "load_ouro", "make_mesh",
    "mixture_logits", "mixture_logits_loss", "ouro_1_4b", "ouro_2_6b", "ouro_expected_loss", "ouro_gate_loss",
    "pondernet_loss", "sample_loop_count", "save_ouro", "step_cross_entropy", "tiny", "train", "train_flops",
]
