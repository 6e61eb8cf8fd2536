"""Greedy generation from a local Ouro checkpoint with per-token early exit, printing each token's exit depth.

    python -m experiments.ouro_generate --path /ckpt/Ouro-1.4B --prompt "The capital of France is"
    python -m experiments.ouro_generate --path tests/data/ouro --prompt-ids 61,162,248 --threshold 0.5

Works offline. Text goes through the checkpoint's tokenizer.json (``tokenizers`` package); without one, the prompt
is UTF-8 bytes (token id = byte value). The exit rule is Ouro's Q-exit at ``--threshold`` (default: the
checkpoint's ``early_exit_threshold``; 1.0 in the released configs, i.e. always the last loop).
``--kv-mode compute_all`` (default) runs every loop for every token and only picks the read-out loop, exactly as
the HF reference code; ``per_step`` really skips the loops after a token's exit (see ``lj.generate``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import numpy as np

import loopjax as lj
from loopjax.convert import load_tokenizer, ouro_exit_rule, read_hf_config
from loopjax.generate.text import decode, encode


@dataclasses.dataclass(frozen=True)
class Generated:
    """prompt_ids; token_ids / pieces / exit_steps (1-based loop each token was read from); n_loops; text."""

    prompt_ids: list[int]
    token_ids: list[int]
    pieces: list[str]
    exit_steps: list[int]
    n_loops: int
    text: str


def generate_ouro(path: str, *, prompt: str | None = None, prompt_ids: list[int] | None = None,
                  max_new_tokens: int = 32, threshold: float | None = None, kv_mode: str = "compute_all",
                  dtype: str | None = None, stop_at_eos: bool = True) -> Generated:
    """Load the checkpoint at ``path`` and continue the prompt (text or token ids) greedily."""
    hf = read_hf_config(path)
    model = lj.load_ouro(path, dtype=dtype)
    tokenizer = load_tokenizer(path)
    ids = list(prompt_ids) if prompt_ids is not None else encode(prompt or "", tokenizer, model.cfg.vocab_size)
    rule = lj.QExit(threshold) if threshold is not None else ouro_exit_rule(hf)
    eos = hf.get("eos_token_id") if stop_at_eos else None
    out = lj.generate(model, np.asarray([ids], np.int32), max_new_tokens, exit_rule=rule, kv_mode=kv_mode,
                      stop_tokens=eos)
    n = int(out.lengths[0])
    new = [int(t) for t in np.asarray(out.tokens[0, :n])]
    return Generated(prompt_ids=ids, token_ids=new, pieces=[decode([t], tokenizer) for t in new],
                     exit_steps=[int(e) for e in np.asarray(out.exit_steps[0, :n])], n_loops=model.cfg.n_loops,
                     text=decode(new, tokenizer))


def main(argv: list[str] | None = None) -> Generated:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", required=True, help="checkpoint folder (config.json + *.safetensors)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text (tokenizer.json, else UTF-8 bytes)")
    g.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threshold", type=float, default=None, help="Q-exit threshold (default: the config's)")
    p.add_argument("--kv-mode", default="compute_all", choices=["compute_all", "per_step", "last_step"])
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the checkpoint's)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the config's eos_token_id")
    args = p.parse_args(argv)
    ids = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else None
    res = generate_ouro(args.path, prompt=args.prompt, prompt_ids=ids, max_new_tokens=args.max_new_tokens,
                        threshold=args.threshold, kv_mode=args.kv_mode, dtype=args.dtype,
                        stop_at_eos=not args.ignore_eos)
    print(f"prompt ids: {res.prompt_ids}  ({jax.default_backend()})")
    print("  #  token  exit  piece")
    for i, (t, e, piece) in enumerate(zip(res.token_ids, res.exit_steps, res.pieces)):
        print(f"{i:3d}  {t:5d}  {e}/{res.n_loops}  {piece!r}")
    mean = float(np.mean(res.exit_steps)) if res.exit_steps else float("nan")
    print(f"mean exit depth {mean:.2f} of {res.n_loops} loops")
    print(f"text: {res.text!r}")
    sys.stdout.flush()
    return res


if __name__ == "__main__":
    main()
