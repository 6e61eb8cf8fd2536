"""Depth entries of an evaluation and the FLOPs each costs per token.

A depth is an int d >= 1 (every token runs d loops and reads out the last), ``"adaptive"`` (Ouro's published
semantics: every token runs all L loops, the exit rule picks the loop each token reads out; the figures of the
one all-depths pass) or ``"adaptive-frozen"`` (the masked while-loop: a token stops at its exit and stays
frozen, so it runs only its own loops; its own pass).
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence

from loopjax.config import LoopedConfig
from loopjax.flops import forward_flops

ADAPTIVE, FROZEN = "adaptive", "adaptive-frozen"
NAMED = (ADAPTIVE, FROZEN)
Depth = int | str


def parse_depths(spec: str | Sequence[Depth], n_loops: int, *, has_rule: bool) -> tuple[Depth, ...]:
    """Depth entries from "1,2,4,adaptive" (or a sequence); checks each against the model.

    n_loops: the model's L. An int above it is run (any loopjax model extrapolates: parameters do not depend on
    the loop count) with a warning, since the model never trained that deep.
    """
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError(f"depths={spec!r}: must name at least one depth (1..{n_loops}, {ADAPTIVE!r}, {FROZEN!r})")
    out: list[Depth] = []
    for item in items:
        if isinstance(item, str) and item.lower() in NAMED:
            if not has_rule:
                raise ValueError(f"depth {item!r}: needs an exit rule; this model has no exit gate, so pass one "
                                 "that needs none (--exit-rule conv=0.01) or drop the adaptive depths")
            d: Depth = item.lower()
        else:
            try:
                d = int(item)
            except (TypeError, ValueError):
                near = difflib.get_close_matches(str(item), NAMED, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ValueError(f"depth {item!r}: must be an int >= 1, {ADAPTIVE!r} or {FROZEN!r}{hint}") from None
            if isinstance(item, bool) or d < 1:
                raise ValueError(f"depth {item!r}: must be an int >= 1, {ADAPTIVE!r} or {FROZEN!r}")
            if d > n_loops:
                warnings.warn(f"depth {d}: deeper than the model's n_loops={n_loops}; running it extrapolates "
                              "(same weights, loops it never trained)", stacklevel=2)
        if d in out:
            raise ValueError(f"depths={spec!r}: names {d!r} twice")
        out.append(d)
    return tuple(out)


def pass_loops(depths: Sequence[Depth], n_loops: int) -> int:
    """T, the loops the all-depths pass runs: the deepest int, or L when the adaptive read-out is asked for."""
    ints = [d for d in depths if isinstance(d, int)]
    return max(ints + ([n_loops] if ADAPTIVE in depths or not ints else []))


def sequence_flops(cfg: LoopedConfig, n_tokens: int, loops: float) -> float:
    """FLOPs of one forward over ``n_tokens`` tokens at ``loops`` loops (a mean over tokens when adaptive),
    one read-out (``flops.forward_flops``, dense attention as executed)."""
    return float(forward_flops(cfg, n_tokens, loops))
