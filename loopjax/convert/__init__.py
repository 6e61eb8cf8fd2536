"""Checkpoint conversion: HuggingFace Ouro safetensors import and export."""

from loopjax.convert.ouro import (WeightSpec, hf_ouro_config, load_ouro, load_tokenizer, ouro_config, ouro_exit_rule,
                                  read_hf_config, save_ouro, weight_specs)

__all__ = ["WeightSpec", "hf_ouro_config", "load_ouro", "load_tokenizer", "ouro_config", "ouro_exit_rule",
           "read_hf_config", "save_ouro", "weight_specs"]
