"""Think harder or know more? Per-layer loops vs gated memory banks vs wider / deeper baselines (Frey et al. 2026).

    python -m experiments.think_or_know                      # --preset cpu: the committed results
    python -m experiments.think_or_know --capacity           # measure Base's fact capacity (sizes the table)
    python -m experiments.think_or_know --preset paper       # the paper's model sizes (frey_200m arms), accelerator
    python -m experiments.think_or_know --smoke              # seconds: an end-to-end check

One training stream mixes (a) reasoning whose facts are in the context -- p-hop induction and n-ary addition from
``loopjax.data.tasks``, scored on held-out instances -- and (b) recall of facts stored only in the weights -- a fixed
random ``FactTable`` of (subject, relation) -> object triples with multi-token subjects, scored over the whole table.
Every arm is a config of the same ``LoopedLM``: Base; Loop (every core layer iterates up to N times with its own
halting router, ``layer_loops=N``); Mem (local + global gated memory banks); Loop+Mem; Base-wide (MLP widened to
Mem's parameter count, within 1%); IsoFLOP-deep (more layers, within 2% of Loop's training FLOPs); IsoFLOP-M (as
many layers, MLP widened to Loop+Mem's training FLOPs, within 2%). The matching uses ``count_params`` and
``loopjax.flops.train_flops`` (every layer iteration and memory read charged), and the table prints both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import loopjax as lj
from experiments.common import experiment_parser, markdown_table, mean_pm, resolve_preset, write_results
from experiments.grid import enable_compile_cache, train_config
from loopjax.analysis.plots import plot_layer_specialisation
from loopjax.analysis.specialisation import layer_profile
from loopjax.config import LoopedConfig
from loopjax.data.tasks import Addition, FactTable, Mixture, PHop
from loopjax.train.tasks import EVAL_SEED, fit_on_task, task_accuracy

FAMILIES = ("phop", "addition", "facts")
ARMS = ("Base", "Loop", "Mem", "Loop+Mem", "Base-wide", "IsoFLOP-deep", "IsoFLOP-M")
PARAM_TOL, FLOP_TOL = 0.01, 0.02  # the matching tolerances (relative)
SCALE_ONE = math.log(math.e - 1)  # softplus(SCALE_ONE) = 1

TRAIN = dict(schedule="cosine", grad_clip=1.0)
PRESETS = {
    # The paper's Base (12 layers, d_model 768, 12 heads, SwiGLU 2048), Loop-3, 1024 local / 512 global slots with
    # the gate bias it reports best; tasks and table scaled up to match. Sized for a TPU / GPU, not run here.
    "paper": dict(n_layers=12, d_model=768, n_heads=12, d_ff=2048, layer_loops=3, layer_loop_scale_init=-7.0,
                  memory_local_slots=1024,
                  memory_global_slots=512, memory_gate_bias=3.0, phop_alphabet=4, phop_n=64, hops=(2, 4, 8),
                  add_terms=(2, 4, 8, 16), add_digits=3, n_subjects=65536, n_relations=8, n_objects=512,
                  subject_tokens=3, n_syllables=128, capacity_subjects=(16384, 32768, 65536, 131072),
                  weights=(1.0, 1.0, 2.0), batch_size=256, steps=50_000, learning_rate=3e-3, warmup_steps=500,
                  weight_decay=0.1, eval_count=2048, seeds=(0,), **TRAIN),
    # layer_loop_scale_init: softplus(a) = 1 at init, every iteration a full residual update. The paper's -7
    # (s ~ 1e-3, near-identity layers) cannot grow in 1000 steps: such a Loop arm stayed below Base on every family
    # (see the results README).
    "cpu": dict(n_layers=2, d_model=64, n_heads=4, d_ff=256, layer_loops=3, layer_loop_scale_init=SCALE_ONE,
                memory_local_slots=64,
                memory_global_slots=32, memory_gate_bias=3.0, phop_alphabet=4, phop_n=16, hops=(1, 2),
                add_terms=(1, 2, 4), add_digits=2, n_subjects=256, n_relations=4, n_objects=32, subject_tokens=2,
                n_syllables=32, capacity_subjects=(128, 256, 512, 1024), weights=(1.0, 1.0, 2.0),
                batch_size=64, steps=1000, learning_rate=3e-3, warmup_steps=50, weight_decay=0.0, eval_count=512,
                seeds=(0,), **TRAIN),
    "smoke": dict(n_layers=1, d_model=16, n_heads=2, d_ff=32, layer_loops=2, layer_loop_scale_init=-7.0,
                  memory_local_slots=4,
                  memory_global_slots=2, memory_gate_bias=3.0, phop_alphabet=3, phop_n=8, hops=(1, 2), add_terms=(1, 2),
                  add_digits=1, n_subjects=16, n_relations=2, n_objects=5, subject_tokens=2, n_syllables=6,
                  capacity_subjects=(8, 16), weights=(1.0, 1.0, 1.0), batch_size=8, steps=3, learning_rate=1e-3,
                  warmup_steps=1, weight_decay=0.0, eval_count=16, seeds=(0,), **TRAIN),
}


# ---------------------------------------------------------------------------------------------------- data stream

def make_stream(preset: dict, n_subjects: int | None = None) -> Mixture:
    """The mixed training stream: p-hop, n-ary addition and the fact table, in one vocabulary."""
    phop = PHop(alphabet=preset["phop_alphabet"], n=preset["phop_n"], hops=preset["hops"], dense_labels=True)
    addition = Addition(n_terms=preset["add_terms"], digits=preset["add_digits"], place_tokens=True)
    facts = FactTable(n_subjects=n_subjects or preset["n_subjects"], n_relations=preset["n_relations"],
                      n_objects=preset["n_objects"], subject_tokens=preset["subject_tokens"],
                      n_syllables=preset["n_syllables"])
    return Mixture((phop, addition, facts), FAMILIES, weights=preset["weights"])


def score(model, stream: Mixture, eval_count: int) -> dict[str, float]:
    """Accuracy per family: held-out p-hop and addition instances, and every fact of the table once."""
    table = stream.tasks[FAMILIES.index("facts")]
    counts = {"phop": eval_count, "addition": eval_count, "facts": table.n_facts}
    return {name: task_accuracy(model, stream.member(name), count=counts[name]).accuracy for name in FAMILIES}


# ---------------------------------------------------------------------------------------------------- arms

def params_of(cfg: LoopedConfig) -> int:
    """``count_params`` of the model a config builds (abstractly: no memory is allocated)."""
    return lj.count_params(nnx.eval_shape(lambda: lj.LoopedLM(cfg, rngs=nnx.Rngs(0))))


def train_flops_per_token(cfg: LoopedConfig, seq_len: int) -> float:
    """``loopjax.flops.train_flops`` per token: every layer iteration and memory read, forward and backward."""
    return lj.train_flops(cfg, seq_len) / seq_len


def closest_int(measure: Callable[[int], float], target: float, lo: int, hi: int) -> int:
    """The integer x in [lo, hi] whose ``measure(x)`` (non-decreasing in x) is closest to ``target``."""
    a, b = lo, hi
    while b - a > 1:  # invariant once bracketed: measure(a) <= target <= measure(b)
        mid = (a + b) // 2
        if measure(mid) <= target:
            a = mid
        else:
            b = mid
    return min((a, b), key=lambda x: abs(measure(x) - target))


def _check_match(arm: str, what: str, got: float, target: float, tol: float) -> None:
    if abs(got - target) > tol * target:
        raise ValueError(f"arm {arm}: {what} {got:,.0f} is not within {100 * tol:g}% of its target {target:,.0f}; "
                         "change the preset's sizes")


def base_config(preset: dict, vocab_size: int, seq_len: int) -> LoopedConfig:
    """Base: ``n_layers`` distinct layers run once (no block loop, no exit gate, no per-layer loop, no memory)."""
    return LoopedConfig(vocab_size=vocab_size, max_seq_len=seq_len, n_layers=preset["n_layers"], n_loops=1,
                        d_model=preset["d_model"], n_heads=preset["n_heads"], n_kv_heads=preset["n_heads"],
                        d_ff=preset["d_ff"], exit_gate=False)


def arm_configs(preset: dict, vocab_size: int, seq_len: int,
                names: tuple[str, ...] = ARMS) -> dict[str, LoopedConfig]:
    """The arms ``names`` (default all seven, in ``ARMS`` order) as configs of one model class, matched by
    ``count_params`` and ``train_flops`` (an arm's match target is built when needed)."""
    unknown = sorted(set(names) - set(ARMS))
    if unknown:
        raise ValueError(f"arms {unknown}: must be among {list(ARMS)}")
    base = base_config(preset, vocab_size, seq_len)
    n = preset["layer_loops"]
    memory = dict(memory_local_slots=preset["memory_local_slots"], memory_global_slots=preset["memory_global_slots"],
                  memory_gate_bias=preset["memory_gate_bias"])
    flops = lambda cfg: train_flops_per_token(cfg, seq_len)  # noqa: E731
    d_ff_max = 64 * preset["d_ff"]

    def wide() -> LoopedConfig:
        target = params_of(get("Mem"))
        cfg = dataclasses.replace(base, d_ff=closest_int(lambda f: params_of(dataclasses.replace(base, d_ff=f)),
                                                         target, base.d_ff, d_ff_max))
        _check_match("Base-wide", "params", params_of(cfg), target, PARAM_TOL)
        return cfg

    def deep() -> LoopedConfig:
        """More layers (closest FLOPs to Loop's), then the MLP width that brings the FLOPs within tolerance."""
        target = flops(get("Loop"))
        layers = closest_int(lambda k: flops(dataclasses.replace(base, n_layers=k)), target, base.n_layers,
                             8 * n * base.n_layers)
        cfg = dataclasses.replace(base, n_layers=layers)
        if abs(flops(cfg) - target) > FLOP_TOL * target:
            cfg = dataclasses.replace(cfg, d_ff=closest_int(lambda f: flops(dataclasses.replace(cfg, d_ff=f)),
                                                            target, 1, d_ff_max))
        _check_match("IsoFLOP-deep", "train FLOPs/token", flops(cfg), target, FLOP_TOL)
        return cfg

    def iso_m() -> LoopedConfig:
        """IsoFLOP-deep's layer count, MLP widened to Loop+Mem's FLOPs (the paper's "36 wider layers")."""
        layers, target = get("IsoFLOP-deep"), flops(get("Loop+Mem"))
        cfg = dataclasses.replace(layers, d_ff=closest_int(lambda f: flops(dataclasses.replace(layers, d_ff=f)),
                                                           target, layers.d_ff, d_ff_max))
        _check_match("IsoFLOP-M", "train FLOPs/token", flops(cfg), target, FLOP_TOL)
        return cfg

    loop = dict(layer_loops=n, layer_loop_scale_init=preset["layer_loop_scale_init"])
    build = {"Base": lambda: base, "Loop": lambda: dataclasses.replace(base, **loop),
             "Mem": lambda: dataclasses.replace(base, **memory),
             "Loop+Mem": lambda: dataclasses.replace(base, **loop, **memory),
             "Base-wide": wide, "IsoFLOP-deep": deep, "IsoFLOP-M": iso_m}
    built: dict[str, LoopedConfig] = {}

    def get(name: str) -> LoopedConfig:
        if name not in built:
            built[name] = build[name]()
        return built[name]

    return {name: get(name) for name in ARMS if name in names}


def arm_shape(cfg: LoopedConfig) -> str:
    """``"2L d_ff 256 N=3 mem 64/32"``: what distinguishes an arm."""
    text = f"{cfg.n_layers}L d_ff {cfg.d_ff}"
    if cfg.layer_loops > 1:
        text += f" N={cfg.layer_loops}"
    if getattr(cfg, "memory_local_slots", 0) or getattr(cfg, "memory_global_slots", 0):
        text += f" mem {cfg.memory_local_slots}/{cfg.memory_global_slots}"
    return text


def profile_of(model, stream: Mixture, count: int) -> dict[str, list[float] | None]:
    """Per-layer E[n] and gate values at the answer positions of ``count`` held-out rows of the stream."""
    batch = stream.eval_batch(seed=EVAL_SEED, count=count)
    return layer_profile(model, batch["inputs"], batch["mask"])


# ---------------------------------------------------------------------------------------------------- capacity

def measure_capacity(preset: dict, argv: list[str]) -> Path:
    """Train Base on the mixed stream with tables of growing size; write the recall per table size."""
    start = time.perf_counter()
    rows, data = [], []
    seed = preset["seeds"][0]
    for n_subjects in preset["capacity_subjects"]:
        stream = make_stream(preset, n_subjects)
        cfg = base_config(preset, stream.vocab_size, stream.length)
        t0 = time.perf_counter()
        trainer = fit_on_task(cfg, train_config(preset, stream.length, seed), stream, progress=False)
        acc = score(trainer.model(), stream, preset["eval_count"])
        facts = stream.tasks[FAMILIES.index("facts")]
        row = {"subjects": n_subjects, "facts": facts.n_facts, "recall (%)": f"{100 * acc['facts']:.1f}",
               "facts recalled": round(acc["facts"] * facts.n_facts),
               "phop (%)": f"{100 * acc['phop']:.1f}", "addition (%)": f"{100 * acc['addition']:.1f}",
               "train s": f"{time.perf_counter() - t0:.0f}"}
        print(row, flush=True)
        rows.append(row)
        data.append({"n_subjects": n_subjects, "n_facts": facts.n_facts, "accuracy": acc})
    out = Path(preset["out"])
    out.mkdir(parents=True, exist_ok=True)
    minutes = (time.perf_counter() - start) / 60
    command = shlex.join(["python", "-m", "experiments.think_or_know", *argv])
    table = markdown_table(list(rows[0]), rows)
    (out / "capacity.md").write_text(
        f"# Base's fact capacity\n\n```\n{command}\n```\n\n{table}\n\nBase ({cfg.n_layers}L d_ff {cfg.d_ff}, d_model "
        f"{cfg.d_model}) trained on the mixed stream (weights {list(preset['weights'])} for "
        f"{list(FAMILIES)}) for {preset['steps']} steps of batch {preset['batch_size']}, seed {seed}, once per table "
        f"size; recall is exact match over every fact of the table. {minutes:.1f} min.\n")
    (out / "capacity.json").write_text(json.dumps({"command": command, "rows": data}, indent=1) + "\n")
    print(f"\n{table}\n\ncapacity: {out / 'capacity.md'}")
    return out / "capacity.md"


# ---------------------------------------------------------------------------------------------------- the experiment

@dataclasses.dataclass
class ArmResult:
    """One arm over its seeds: accuracy[family] per seed; the layer profile of its first seed."""

    name: str
    cfg: LoopedConfig
    params: int
    train_flops_per_token: float
    accuracy: dict[str, list[float]]
    profile: dict[str, list[float] | None]
    train_seconds: list[float]
    wall_seconds: float  # training, scoring and profiling, every seed

    @property
    def mean_expected_steps(self) -> float | None:
        en = self.profile["expected_steps"]
        return None if en is None else float(np.mean(en))


# Preset keys that reach an arm only through its config (compared on their own) or not at all.
ARM_KEYS = ("n_layers", "d_model", "n_heads", "d_ff", "layer_loops", "layer_loop_scale_init", "memory_local_slots",
            "memory_global_slots", "memory_gate_bias", "capacity_subjects", "out")


def _preset_key(preset: dict) -> str:
    return json.dumps({k: v for k, v in preset.items() if k != "out"}, sort_keys=True, default=str)


def _run_keys(preset_json: str) -> dict:
    """What an arm's cached result depends on besides its config: the stream, training and scoring keys."""
    return {k: v for k, v in json.loads(preset_json).items() if k not in ARM_KEYS}


def _cache_path(preset: dict, name: str) -> Path:
    return Path(preset["out"]) / "arms" / (name.replace("+", "_").lower() + ".json")


def run_arms(preset: dict, stream: Mixture, names: tuple[str, ...] = ARMS, *,
             log: Callable[[str], None] = print) -> list[ArmResult]:
    """Train the arms ``names`` on the stream for every seed; score each family; profile E[n] and gates by layer.
    Each arm's result is also written to ``out/arms/NAME.json`` (``cached_arms`` reads it back)."""
    results = []
    for name, cfg in arm_configs(preset, stream.vocab_size, stream.length, names).items():
        accuracy: dict[str, list[float]] = {f: [] for f in FAMILIES}
        seconds, profile = [], None
        wall = time.perf_counter()
        for seed in preset["seeds"]:
            start = time.perf_counter()
            trainer = fit_on_task(cfg, train_config(preset, stream.length, seed), stream, progress=False)
            seconds.append(time.perf_counter() - start)
            model = trainer.model()
            for family, acc in score(model, stream, preset["eval_count"]).items():
                accuracy[family].append(acc)
            if profile is None:
                profile = profile_of(model, stream, preset["eval_count"])
            scores = " ".join(f"{f}:{100 * v[-1]:.1f}" for f, v in accuracy.items())
            log(f"{name:>12} seed {seed}: {seconds[-1]:6.1f}s  accuracy % {scores}")
        result = ArmResult(name=name, cfg=cfg, params=params_of(cfg),
                           train_flops_per_token=train_flops_per_token(cfg, stream.length), accuracy=accuracy,
                           profile=profile, train_seconds=seconds, wall_seconds=time.perf_counter() - wall)
        path = _cache_path(preset, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"preset": _preset_key(preset), "config": dataclasses.asdict(cfg),
                                    **{k: v for k, v in dataclasses.asdict(result).items() if k != "cfg"}},
                                   default=str) + "\n")
        results.append(result)
    return results


def cached_arms(preset: dict, stream: Mixture, names: tuple[str, ...]) -> list[ArmResult]:
    """The results in ``out/arms/`` of the arms ``names`` trained earlier with this very preset and config."""
    results = []
    for name in names:
        path = _cache_path(preset, name)
        if not path.exists():
            continue
        cfg = arm_configs(preset, stream.vocab_size, stream.length, (name,))[name]
        saved = json.loads(path.read_text())
        if _run_keys(saved["preset"]) != _run_keys(_preset_key(preset)) or saved["config"] != json.loads(
                json.dumps(dataclasses.asdict(cfg), default=str)):
            print(f"{path}: trained with another preset or config; not used")
            continue
        fields = {k: saved[k] for k in ("name", "params", "train_flops_per_token", "accuracy", "profile",
                                        "train_seconds", "wall_seconds")}
        results.append(ArmResult(cfg=cfg, **fields))
    return results


def table_rows(results: list[ArmResult]) -> tuple[list[str], list[dict]]:
    columns = ["arm", "shape", "params", "train FLOPs/token", *(f"{f} (%)" for f in FAMILIES), "mean E[n]",
               "train s"]
    rows = []
    for r in results:
        row = {"arm": r.name, "shape": arm_shape(r.cfg), "params": r.params,
               "train FLOPs/token": f"{r.train_flops_per_token:,.0f}",
               "mean E[n]": None if r.mean_expected_steps is None else f"{r.mean_expected_steps:.2f}",
               "train s": f"{np.mean(r.train_seconds):.0f}"}
        for f in FAMILIES:
            row[f"{f} (%)"] = mean_pm(r.accuracy[f])
        rows.append(row)
    return columns, rows


def plot_accuracy(results: list[ArmResult], path: Path) -> Path:
    """Grouped bars: accuracy per arm, one bar per task family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(results))
    width = 0.8 / len(FAMILIES)
    fig, ax = plt.subplots(figsize=(8.5, 3.8), layout="constrained")
    for i, f in enumerate(FAMILIES):
        acc = np.array([np.mean(r.accuracy[f]) for r in results]) * 100
        ax.bar(x + (i - (len(FAMILIES) - 1) / 2) * width, acc, width, label=f)
    ax.set_xticks(x, [r.name for r in results], rotation=15)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("think harder or know more: accuracy per task family")
    ax.legend(fontsize="small", ncols=len(FAMILIES))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def results_data(preset: dict, results: list[ArmResult], stream: Mixture) -> dict:
    return {"preset": {k: (str(v) if isinstance(v, Path) else v) for k, v in preset.items()},
            "stream": {"vocab_size": stream.vocab_size, "seq_len": stream.length,
                       "n_facts": stream.tasks[FAMILIES.index("facts")].n_facts},
            "arms": [{"name": r.name, "params": r.params, "train_flops_per_token": r.train_flops_per_token,
                      "accuracy": {f: float(np.mean(v)) for f, v in r.accuracy.items()},
                      "accuracy_per_seed": r.accuracy, "seeds": list(preset["seeds"]),
                      "mean_expected_steps": r.mean_expected_steps, **r.profile,
                      "config": {k: v for k, v in dataclasses.asdict(r.cfg).items()
                                 if k in ("n_layers", "d_model", "d_ff", "layer_loops", "memory_local_slots",
                                          "memory_global_slots", "memory_gate_bias")},
                      "train_seconds": [round(s, 1) for s in r.train_seconds],
                      "wall_seconds": round(r.wall_seconds, 1)} for r in results]}


def run(preset: dict, argv: list[str], names: tuple[str, ...] = ARMS) -> Path:
    """Train and score the arms ``names`` (default all; any other arm's earlier result with the same preset and
    config comes from ``out/arms/``); write README.md, results.json, command.txt and the plots into
    ``preset["out"]``."""
    start = time.perf_counter()
    stream = make_stream(preset)
    trained = run_arms(preset, stream, names)
    earlier = cached_arms(preset, stream, tuple(n for n in ARMS if n not in names)) if names != ARMS else []
    results = sorted(trained + earlier, key=lambda r: ARMS.index(r.name))
    out = Path(preset["out"])
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy(results, out / "think_or_know.png")
    plot_layer_specialisation({r.name: r.profile for r in results}, out / "layers.png",
                              title="per-layer E[n] and memory gate value")
    columns, rows = table_rows(results)
    minutes = (time.perf_counter() - start) / 60
    arm_minutes = sum(r.wall_seconds for r in results) / 60
    facts = stream.tasks[FAMILIES.index("facts")]
    capacity = out / "capacity.md"
    notes = (f"Stream: p-hop (alphabet {preset['phop_alphabet']}, n = {preset['phop_n']}, p in "
             f"{list(preset['hops'])}, dense labels), n-ary addition (n in {list(preset['add_terms'])}, "
             f"{preset['add_digits']} digits, place tokens) and a table of {facts.n_facts} facts ({facts.n_subjects} "
             f"subjects of {facts.subject_tokens} syllables out of {facts.n_syllables}, {facts.n_relations} relations, "
             f"{facts.n_objects} objects), mixed with weights {list(preset['weights'])}, rows of "
             f"{stream.length} tokens; {preset['steps']} steps of batch {preset['batch_size']}, lr "
             f"{preset['learning_rate']} cosine, weight decay {preset['weight_decay']}. p-hop and addition are scored "
             f"on {preset['eval_count']} held-out instances each, facts over the whole table. Parameters from "
             "`count_params`, training FLOPs per token from `loopjax.flops.train_flops` (every layer iteration and "
             "memory read charged); Base-wide is matched to Mem's parameters within 1%, IsoFLOP-deep to Loop's and "
             "IsoFLOP-M to Loop+Mem's training FLOPs within 2%. Mean E[n] and the per-layer profile are measured at "
             "the answer positions of held-out rows."
             + (f" The table size comes from [capacity.md](capacity.md)." if capacity.exists() else "")
             + f"\n\nPreset `{preset['preset']}`, seeds {list(preset['seeds'])}, {minutes:.1f} min in all on "
             f"{jax.devices()[0].platform}"
             + (f" for the arms trained by this command ({', '.join(r.name for r in trained)}); the others "
                f"({', '.join(r.name for r in earlier)}) come from earlier runs of the same preset "
                f"(`--arms`, results in `arms/`): {arm_minutes:.1f} min of arm wall time in all" if earlier else "")
             + ". Plots: [think_or_know.png](think_or_know.png), [layers.png](layers.png).")
    return write_results(out, title="think harder or know more: per-layer loops vs memory banks", columns=columns,
                         rows=rows, notes=notes, data=results_data(preset, results, stream),
                         command=shlex.join(["python", "-m", "experiments.think_or_know", *argv]))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = experiment_parser("think_or_know", __doc__, PRESETS)
    parser.add_argument("--capacity", action="store_true",
                        help="measure Base's recall on tables of the preset's capacity_subjects sizes instead")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=None,
                        help="train only these arms; the table takes the others from earlier runs of the same "
                             "preset (out/arms/NAME.json), where their preset and config match")
    args = parser.parse_args(argv)
    preset = resolve_preset(args, PRESETS)
    if args.capacity:
        measure_capacity(preset, argv)
        return
    run(preset, argv, tuple(args.arms) if args.arms else ARMS)


if __name__ == "__main__":
    enable_compile_cache()
    main(sys.argv[1:])
