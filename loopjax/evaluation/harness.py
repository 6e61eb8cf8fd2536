"""``LoopjaxLM``: the lm-evaluation-harness backend (registered as ``loopjax``), every loop depth from one pass.

    lm = LoopjaxLM(model, load_eval_tokenizer("bytes"), depths=(1, 2, 4, "adaptive"), exit_rule=lj.QExit(0.5))
    for d in lm.depths:
        lm.set_depth(d)
        results = lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=tm)

Log-likelihoods of every depth come from one cached all-depths pass (``scoring.Scorer``): the first
``simple_evaluate`` scores each request once at all depths, later depths read the cache. ``adaptive-frozen``
has its own pass, and generation runs per depth. Every process of a multi-process run must make the same calls
in the same order (the harness's request order is deterministic); each runs the sharded program on its own
rows and reads back the replicated result, so every process returns the same numbers (``rank`` stays 0 and
``world_size`` 1 so the harness does not split requests itself; write results from process 0 only).
"""

from __future__ import annotations

import collections
import json
from typing import Any

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from loopjax import halting
from loopjax.config import MeshConfig
from loopjax.evaluation import depths as dp
from loopjax.evaluation.scoring import Scorer, length_buckets, truncate
from loopjax.evaluation.tokenizer import EvalTokenizer
from loopjax.generate import Sampling, generate
from loopjax.sharding import make_mesh, rules_for, use_rules


def _host(x: jax.Array) -> np.ndarray:
    """The whole array on this host (gathered from the other processes when it spans them)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@register_model("loopjax")
class LoopjaxLM(TemplateLM):
    """A loopjax model as an lm-eval ``TemplateLM``.

    model: a ``LoopedLM``; tokenizer: an ``EvalTokenizer`` (``load_eval_tokenizer``).
    depths: the depth entries this object will be asked for (ints, "adaptive", "adaptive-frozen"; default
      1..L, plus "adaptive" when there is an exit rule); ``set_depth`` picks the one answered.
    exit_rule: the adaptive rule (default QExit(0.5) when the model has an exit gate, else None).
    batch_size: rows per compiled batch (rounded up to the mesh's batch shards); max_length: input tokens per
      request (default the model's max_seq_len; longer contexts are left-truncated); max_gen_toks: default
      generation budget when a task names none.
    mesh, rules: where to run (default: every device, batch over "data", parameters replicated).
    """

    def __init__(self, model, tokenizer: EvalTokenizer, *, depths=None, exit_rule: Any = "default",
                 batch_size: int = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 mesh=None, rules=None, seed: int = 0, progress: bool = True):
        super().__init__()
        cfg = model.cfg
        tokenizer.check_model(cfg.vocab_size)
        if exit_rule == "default":
            exit_rule = halting.QExit(0.5) if cfg.exit_gate else None
        halting.validate_exit_rule(exit_rule, cfg.n_loops, cfg.exit_gate)
        self.cfg, self.tokenizer, self.exit_rule = cfg, tokenizer, exit_rule
        if depths is None:
            depths = list(range(1, cfg.n_loops + 1)) + ([dp.ADAPTIVE] if exit_rule is not None else [])
        self.depths = dp.parse_depths(depths, cfg.n_loops, has_rule=exit_rule is not None)
        for name, v, lo in (("batch_size", batch_size, 1), ("max_gen_toks", max_gen_toks, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}={v!r}: must be an int >= {lo}")
        max_length = cfg.max_seq_len if max_length is None else max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= cfg.max_seq_len:
            raise ValueError(f"max_length={max_length!r}: must be an int in [2, max_seq_len={cfg.max_seq_len}]")
        self.batch_size, self._max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks
        if mesh is None:
            mesh, rules = make_mesh(MeshConfig()), rules_for("dp")
        elif rules is None:
            raise ValueError("rules: must be given with mesh (sharding.rules_for(preset))")
        self.mesh, self.rules, self.seed, self.progress = mesh, rules, seed, progress
        self.buckets = length_buckets(max_length)
        self.scorer = Scorer(model, mesh, rules, loops=dp.pass_loops(self.depths, cfg.n_loops),
                             exit_rule=exit_rule, rule_loops=cfg.n_loops)
        self.depth = self.depths[0]
        self._cache: dict[tuple, dict] = {}  # TokenRequest -> all-depths figures
        self._frozen_cache: dict[tuple, dict] = {}
        self._task_names: list | None = None
        # (depth, task) -> tokens, flops, exit_sum, exit_tokens
        self.stats: dict[tuple, dict[str, float]] = collections.defaultdict(
            lambda: {"tokens": 0.0, "flops": 0.0, "exit_sum": 0.0, "exit_tokens": 0.0, "requests": 0})

    # ------------------------------------------------------------------ lm-eval plumbing
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "LoopjaxLM":
        """``--model loopjax --model_args path=DIR[,depth=2][,exit_rule=q=0.5][,tokenizer=...]
        [,max_length=N][,step=N]`` (one depth per harness run; ``loopjax lm-eval`` sweeps depths itself)."""
        from loopjax.evaluation.load import load_for_eval
        parse_exit_rule = halting.parse_exit_rule

        args = dict(a.split("=", 1) for a in arg_string.split(",") if a.strip())
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "path" not in args:
            raise ValueError("model_args: must name path=RUN_DIR|OURO_DIR")
        loaded = load_for_eval(args.pop("path"), tokenizer=args.pop("tokenizer", None),
                               step=int(args["step"]) if "step" in args else None)
        args.pop("step", None)
        rule = parse_exit_rule(args.pop("exit_rule")) if "exit_rule" in args else loaded.exit_rule
        depth = args.pop("depth", None)
        kw = {k: int(args.pop(k)) for k in ("max_length", "max_gen_toks", "batch_size") if k in args}
        if args:
            raise ValueError(f"model_args: unknown keys {sorted(args)}")
        if "batch_size" in extra and "batch_size" not in kw and str(extra["batch_size"]).isdigit():
            kw["batch_size"] = int(extra["batch_size"])
        lm = cls(loaded.model, loaded.tokenizer, depths=[depth] if depth else None, exit_rule=rule,
                 mesh=loaded.mesh, rules=loaded.rules, **kw)
        return lm

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.prefix_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def set_depth(self, depth) -> None:
        """Answer every later request at ``depth`` (one of ``self.depths``)."""
        key = depth.lower() if isinstance(depth, str) and not depth.isdigit() else int(depth)
        if key not in self.depths:
            raise ValueError(f"depth {depth!r}: not among this backend's depths {list(self.depths)}")
        self.depth = key

    # ------------------------------------------------------------------ statistics
    def _record(self, task, n_tokens: int, loops: float, exit_sum: float, exit_tokens: int) -> None:
        s = self.stats[(self.depth, task)]
        s["tokens"] += n_tokens
        s["flops"] += dp.sequence_flops(self.cfg, n_tokens, loops)
        s["exit_sum"] += exit_sum
        s["exit_tokens"] += exit_tokens
        s["requests"] += 1

    def depth_stats(self, depth, task) -> dict[str, float]:
        """``mean_exit_depth`` (mean read-out loop of the scored / generated tokens) and ``flops_per_token``
        (forward FLOPs at the loops actually run, per input token) of ``task``'s requests at ``depth``."""
        s = self.stats.get((depth, task))
        if s is None or s["tokens"] == 0:
            return {"mean_exit_depth": None, "flops_per_token": None, "requests": 0}
        return {"mean_exit_depth": s["exit_sum"] / max(s["exit_tokens"], 1),
                "flops_per_token": s["flops"] / s["tokens"], "requests": int(s["requests"])}

    # ------------------------------------------------------------------ log-likelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._task_names = [getattr(r, "task_name", None) for r in requests]
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._task_names = None

    def _bar(self, total: int, desc: str, disable: bool):
        show = self.progress and not disable and jax.process_index() == 0
        return tqdm(total=total, desc=desc, disable=not show)

    def _fill(self, reqs, cache, frozen: bool, disable: bool) -> None:
        missing = list(dict.fromkeys(r for r in reqs if r not in cache))
        if not missing:
            return
        with self._bar(len(missing), f"loglikelihood ({'adaptive-frozen' if frozen else 'all depths'})",
                       disable) as bar:
            res = self.scorer.run(missing, batch_size=self.batch_size, buckets=self.buckets, frozen=frozen,
                                  progress=bar.update)
        for i, r in enumerate(missing):
            cache[r] = {k: v[i] for k, v in res.items()}

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        reqs = [truncate(ctx, cont, self.max_length) for _, ctx, cont in requests]
        tasks = self._task_names or [None] * len(reqs)
        frozen = self.depth == dp.FROZEN
        cache = self._frozen_cache if frozen else self._cache
        self._fill(reqs, cache, frozen, disable_tqdm)
        out = []
        L = self.cfg.n_loops
        for r, task in zip(reqs, tasks):
            c = cache[r]
            if frozen:
                logp, greedy = c["logp"], c["greedy"]
                self._record(task, r.n_inputs, float(c["exit_all"]) / r.n_inputs, float(c["exit_cont"]), r.n_cont)
            elif self.depth == dp.ADAPTIVE:
                logp, greedy = c["logp_exit"], c["greedy_exit"]
                self._record(task, r.n_inputs, L, float(c["exit_cont"]), r.n_cont)  # every loop runs
            else:
                logp, greedy = c["logp_T"][self.depth - 1], c["greedy_T"][self.depth - 1]
                self._record(task, r.n_inputs, self.depth, self.depth * r.n_cont, r.n_cont)
            out.append((float(logp), bool(greedy)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pieces, owner = [], []
        for i, req in enumerate(requests):
            ids = self.tok_encode(req.args[0])
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                pieces.append((None, ctx, cont))
                owner.append(i)
        names = [getattr(r, "task_name", None) for r in requests]
        self._task_names = [names[i] for i in owner]
        try:
            scores = self._loglikelihood_tokens(pieces, disable_tqdm=disable_tqdm)
        finally:
            self._task_names = None
        total = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            total[i] += lp
        return total

    # ------------------------------------------------------------------ generation
    def _gen_settings(self, kwargs: dict) -> tuple[list[str], int, Sampling]:
        kwargs = dict(kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
        sampling = Sampling(temperature, None if top_k is None else int(top_k),
                            None if top_p is None else float(top_p)) if do_sample and temperature > 0 else Sampling()
        return until, max_gen, sampling

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched generation at the current depth: int d runs d loops per token; "adaptive" every loop with
        the rule picking each token's read-out (``kv_mode="compute_all"``); "adaptive-frozen" stops each token
        at its exit (``kv_mode="per_step"``). The text is cut at the first stop string."""
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, r in enumerate(requests):
            groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        out: list[str | None] = [None] * len(requests)
        rows = self.scorer.rows(self.batch_size)
        model = self.scorer.model()
        if isinstance(self.depth, int):
            n_loops, rule, kv_mode = self.depth, None, "per_step"
        else:
            n_loops, rule = self.cfg.n_loops, self.exit_rule
            kv_mode = "compute_all" if self.depth == dp.ADAPTIVE else "per_step"
        with self._bar(len(requests), "generate_until", disable_tqdm) as bar:
            for key, idx in groups.items():
                until, max_gen, sampling = self._gen_settings(requests[idx[0]].args[1])
                if max_gen >= self.max_length:
                    raise ValueError(f"max_gen_toks={max_gen}: must be < max_length={self.max_length}")
                prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen):]
                           or [self.prefix_token_id] for i in idx}
                order = sorted(idx, key=lambda i: (-len(prompts[i]), i))
                for b, lo in enumerate(range(0, len(order), rows)):
                    chunk = order[lo:lo + rows]
                    width = max(len(prompts[i]) for i in chunk)
                    prompt = np.zeros((rows, width), np.int32)
                    mask = np.zeros((rows, width), np.int32)
                    for r in range(rows):  # dummy rows repeat the first prompt
                        p = prompts[chunk[r] if r < len(chunk) else chunk[0]]
                        prompt[r, width - len(p):], mask[r, width - len(p):] = p, 1
                    with use_rules(self.mesh, self.rules):
                        res = generate(model, prompt, max_gen, attention_mask=mask, exit_rule=rule, kv_mode=kv_mode,
                                       sampling=sampling, stop_tokens=[self.eot_token_id], n_loops=n_loops,
                                       seed=self.seed + b, cache_len=None)
                    toks, exits, lengths = (_host(x) for x in (res.tokens, res.exit_steps, res.lengths))
                    for r, i in enumerate(chunk):
                        n = int(lengths[r])
                        ids = [int(t) for t in toks[r, :n]]
                        if ids and ids[-1] == self.eot_token_id:
                            ids = ids[:-1]
                        text = self.tok_decode(ids)
                        for stop in until:
                            if stop and stop in text:
                                text = text[:text.index(stop)]
                        out[i] = text
                        n_prompt, ex = len(prompts[i]), exits[r, :n].astype(np.float64)
                        run = ex if self.depth == dp.FROZEN else np.full(n, n_loops, np.float64)
                        loops = (n_prompt * n_loops + run.sum()) / (n_prompt + n)
                        self._record(requests[i].task_name, n_prompt + n, loops, float(ex.sum()), n)
                    bar.update(len(chunk))
        return out
