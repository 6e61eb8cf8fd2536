"""The one attention seam: ``attend`` computes softmax attention for every caller (train, eval, the masked
while_loop, cached decode, analysis) with one of several backends.

Shapes: B batch, S query length, T key length, N query heads, K kv heads (N % K == 0; query head j uses kv
head j // (N // K)), H head dim.

Which keys a query sees is decided once, here, from token positions and segment ids, never from a mask
passed in: key t is visible to query s iff ``kv_positions[t] <= q_positions[s]`` (causal by position),
``q_positions[s] - kv_positions[t] < sliding_window`` when a window is set, and ``q_segment_ids[s] ==
kv_segment_ids[t]`` when segment ids are given (documents packed in one row never see each other; padding is a
segment of its own). A query that sees no key outputs zeros. Scores and softmax are float32, the output has
q's dtype.

Backends (``IMPLS``, the ``LoopedConfig.attention_impl`` field):
  "reference": einsum over an explicit [B, S, T] mask; the numeric truth, and what analysis reads
    probabilities from (``attention_probs``). Memory O(S·T).
  "chunked": flash-style online softmax over key blocks in pure JAX with a recomputing custom VJP; memory
    O(S·block); any platform.
  "cpu_flash": the same algorithm as one C++ XLA FFI kernel for CPU (``cpu_kernel``; forward and backward),
    built with the host's C++ compiler on first use; faster than "chunked" on XLA:CPU (benchmarks/attention.py).
    One device per program: not under a multi-device mesh (XLA:CPU deadlocks running such a program from the
    persistent compilation cache). ``LOOPJAX_CPU_KERNEL=0`` turns it off.
  "splash": the TPU Pallas splash-attention kernel under ``shard_map`` over the active mesh (batch over the
    batch axes, heads over the tensor axis). Causality comes from token order, so positions must rise by one
    per token within each segment (true of packed rows, full sequences and left-padded prompts).
  "cudnn": ``jax.nn.dot_product_attention(implementation="cudnn")`` on NVIDIA GPUs; token-order causality as
    splash. Packed segment ids are not passed to cuDNN by this jax: calls with segment ids run "chunked".
  "auto": splash on TPU, cuDNN on GPU, cpu_flash on CPU (and chunked where the kernel cannot take the shapes
    or, for cpu_flash, cannot be built or the mesh has several devices);
    the choice is logged once per shape (logger ``loopjax.attention``).
The platform is that of the active mesh (``partitioning.use_rules``), else JAX's default backend, so a step
traced for a TPU topology on a CPU host picks splash.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

from loopjax.attention._checks import check_inputs
from loopjax.attention.reference import attention_probs, reference_attention
from loopjax.config import ATTENTION_IMPLS as IMPLS
from loopjax.partitioning import active_rules

__all__ = ["IMPLS", "TokenLayout", "attend", "attend_cache_slot", "attention_probs", "check_impl",
           "current_platform", "resolve_impl", "visible_mask"]

log = logging.getLogger("loopjax.attention")
_LOGGED: set = set()
SPLASH_BLOCK = 128  # splash needs sequence lengths that are a multiple of its smallest block


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where each token of a [B, S] batch sits: its rotary/causal position and its segment (document) id.

    positions_BS: int32 positions (restart at 0 at each document start in packed rows).
    segment_ids_BS: int32 segment ids, or None (one segment per row).
    """

    positions_BS: jax.Array
    segment_ids_BS: jax.Array | None = None


def visible_mask(q_positions_BS: jax.Array, kv_positions_BT: jax.Array, q_segment_ids_BS: jax.Array | None = None,
                 kv_segment_ids_BT: jax.Array | None = None, sliding_window: int | None = None,
                 kv_valid_BT: jax.Array | None = None) -> jax.Array:
    """Boolean [B, S, T]: key t is visible to query s (the rule in the module docstring; ``kv_valid_BT``
    additionally hides keys, e.g. unwritten cache entries)."""
    q = q_positions_BS[:, :, None]
    k = kv_positions_BT[:, None, :]
    vis = k <= q
    if sliding_window is not None:
        vis &= (q - k) < sliding_window
    if q_segment_ids_BS is not None:
        vis &= q_segment_ids_BS[:, :, None] == kv_segment_ids_BT[:, None, :]
    if kv_valid_BT is not None:
        vis &= kv_valid_BT[:, None, :].astype(bool)
    return vis


def current_platform() -> str:
    """"tpu", "gpu" or "cpu": the active mesh's devices, else JAX's default backend."""
    mesh, _ = active_rules()
    if mesh is not None:
        platform = mesh.devices.flat[0].platform
    else:
        platform = jax.default_backend()
    return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def check_impl(impl: str, *, head_dim: int, dtype=jnp.bfloat16, interpret: bool = False,
               platform: str | None = None) -> None:
    """Raise ``ValueError`` (naming ``attention_impl``, the platform and the alternatives) when ``impl`` cannot
    run here; call it before tracing. "auto", "reference" and "chunked" run everywhere."""
    platform = platform or current_platform()
    if impl not in IMPLS:
        raise ValueError(f"attention_impl={impl!r}: must be one of {IMPLS}")
    if impl == "cpu_flash":
        reason = _cpu_flash_unsupported(platform)
        if reason is not None:
            raise ValueError(f"attention_impl='cpu_flash': {reason}; use 'chunked' or 'auto'")
    if impl == "splash" and platform != "tpu" and not interpret:
        raise ValueError(f"attention_impl='splash': needs a TPU (platform is {platform!r}); use 'chunked' or "
                         "'auto', or attention_interpret=True to run the Pallas kernel in interpret mode")
    if impl == "cudnn":
        if platform != "gpu":
            raise ValueError(f"attention_impl='cudnn': needs an NVIDIA GPU (platform is {platform!r}); use "
                             "'chunked' or 'auto'")
        from loopjax.attention.cudnn import cudnn_supported

        reason = cudnn_supported(head_dim, dtype)
        if reason is not None:
            raise ValueError(f"attention_impl='cudnn': {reason}; use 'chunked' or 'auto'")


def _cpu_flash_unsupported(platform: str) -> str | None:
    if platform != "cpu":
        return f"needs the CPU platform (platform is {platform!r})"
    mesh, _ = active_rules()
    if mesh is not None and mesh.size > 1:
        # XLA:CPU (jax 0.10) deadlocks in its collectives running such a program when it comes from the
        # persistent compilation cache; one device per program only
        return f"runs on one device, and the active mesh has {mesh.size}"
    from loopjax.attention import cpu_kernel

    if not cpu_kernel.available():
        return "the C++ kernel could not be built or is turned off here (see the log of loopjax.attention.cpu_kernel)"
    return None


def _splash_unsupported(q_len: int, kv_len: int) -> str | None:
    if q_len != kv_len:
        return f"query length {q_len} != key length {kv_len}"
    if q_len % SPLASH_BLOCK:
        return f"seq_len={q_len} is not a multiple of {SPLASH_BLOCK}"
    return None


def resolve_impl(impl: str, *, head_dim: int, q_len: int, kv_len: int, has_segments: bool, dtype=jnp.bfloat16,
                 interpret: bool = False, platform: str | None = None) -> str:
    """The backend that runs a call: ``impl`` itself, or for "auto" (and for a kernel that cannot take these
    shapes, e.g. a prefill of odd length) the platform's best fit. Raises as ``check_impl``."""
    platform = platform or current_platform()
    check_impl(impl, head_dim=head_dim, dtype=dtype, interpret=interpret, platform=platform)
    chosen, why = impl, None
    if impl == "auto":
        chosen = {"tpu": "splash", "gpu": "cudnn", "cpu": "cpu_flash"}.get(platform, "chunked")
        if chosen == "cpu_flash":
            why = _cpu_flash_unsupported(platform)
        if chosen == "cudnn":
            from loopjax.attention.cudnn import cudnn_supported

            why = cudnn_supported(head_dim, dtype)
    if chosen == "splash" and why is None:
        why = _splash_unsupported(q_len, kv_len)
    if chosen == "cudnn" and why is None and has_segments:
        why = "segment ids are not supported by this jax's cuDNN path"
    if why is not None:
        chosen = "chunked"
    key = (impl, chosen, platform, q_len, kv_len, has_segments)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("attention_impl=%r on %s, q %d x kv %d%s: using %r%s", impl, platform, q_len, kv_len,
                 " with segment ids" if has_segments else "", chosen, f" ({why})" if why else "")
    return chosen


def attend(q_BSNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, *, q_positions: jax.Array,
           kv_positions: jax.Array, q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
           sliding_window: int | None = None, impl: str = "auto", scale: float | None = None,
           interpret: bool = False) -> jax.Array:
    """Softmax attention of q [B, S, N, H] over k, v [B, T, K, H] → [B, S, N, H] in q's dtype.

    q_positions [B, S], kv_positions [B, T]: int positions (causality and the window); q_segment_ids [B, S],
    kv_segment_ids [B, T]: optional segment ids (both or neither). impl: a backend of ``IMPLS``. scale: score
    scale (default H ** -0.5). interpret: run the Pallas kernel (splash) in interpret mode, for CPU tests.
    """
    check_inputs(q_BSNH, k_BTKH, v_BTKH, q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window)
    s, h, t = q_BSNH.shape[1], q_BSNH.shape[3], k_BTKH.shape[1]
    scale = h ** -0.5 if scale is None else scale
    has_seg = q_segment_ids is not None
    chosen = resolve_impl(impl, head_dim=h, q_len=s, kv_len=t, has_segments=has_seg, dtype=q_BSNH.dtype,
                          interpret=interpret)
    if chosen == "reference":
        vis = visible_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window)
        return reference_attention(q_BSNH, k_BTKH, v_BTKH, vis, scale).astype(q_BSNH.dtype)
    if chosen == "chunked":
        from loopjax.attention.chunked import chunked_attention

        return chunked_attention(q_BSNH, k_BTKH, v_BTKH, q_positions_BS=q_positions, kv_positions_BT=kv_positions,
                                 q_segment_ids_BS=q_segment_ids, kv_segment_ids_BT=kv_segment_ids,
                                 sliding_window=sliding_window, scale=scale)
    if chosen == "cpu_flash":
        from loopjax.attention.cpu_kernel import cpu_flash_attention

        return cpu_flash_attention(q_BSNH, k_BTKH, v_BTKH, q_positions_BS=q_positions, kv_positions_BT=kv_positions,
                                   q_segment_ids_BS=q_segment_ids, kv_segment_ids_BT=kv_segment_ids,
                                   sliding_window=sliding_window, scale=scale)
    if chosen == "splash":
        from loopjax.attention.splash import splash_attention

        mesh, rules = active_rules()
        kwargs = {}
        if mesh is not None:
            kwargs = dict(mesh=mesh, batch_axes=rules.mesh_axes("activation_batch"),
                          head_axes=rules.mesh_axes("activation_heads"))
        return splash_attention(q_BSNH, k_BTKH, v_BTKH, q_segment_ids_BS=q_segment_ids,
                                kv_segment_ids_BT=kv_segment_ids, sliding_window=sliding_window, scale=scale,
                                interpret=interpret, **kwargs)
    from loopjax.attention.cudnn import cudnn_attention

    return cudnn_attention(q_BSNH, k_BTKH, v_BTKH, sliding_window=sliding_window, scale=scale)


def attend_cache_slot(q_B1NH: jax.Array, k_XCH: jax.Array, v_XCH: jax.Array, visible_BC: jax.Array,
                      own_kv: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """One query per row over a KV-cache slot [B·K, C, H] (entries where ``visible_BC``): [B, 1, N, H].

    The decode-step backend: the same math as "reference" (float32 scores, query head j = (kv head j // G,
    group j % G)), written as dots with (row, kv head) as their one batch axis so they read the slot as stored
    (no transposed copy of the cache at any layer or loop step). ``own_kv``: the new token's key and value
    [B, 1, K, H] when the slot does not hold them yet (they are then always visible).
    """
    b, _, n, h = q_B1NH.shape
    kv = k_XCH.shape[0] // b
    q = q_B1NH.reshape(b * kv, n // kv, h)
    scale = h ** -0.5
    scores = jnp.einsum("xgh,xch->xgc", q, k_XCH, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(jnp.repeat(visible_BC, kv, axis=0)[:, None, :], scores, jnp.finfo(jnp.float32).min)
    if own_kv is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(v_XCH.dtype)
        out = jnp.einsum("xgc,xch->xgh", probs, v_XCH)
    else:
        k_X1H, v_X1H = (a.reshape(b * kv, 1, h) for a in own_kv)
        own = jnp.einsum("xgh,xch->xgc", q, k_X1H, preferred_element_type=jnp.float32) * scale
        probs = jax.nn.softmax(jnp.concatenate([scores, own], axis=-1), axis=-1).astype(v_XCH.dtype)
        out = jnp.einsum("xgc,xch->xgh", probs[..., :-1], v_XCH) + probs[..., -1:] * v_X1H.astype(v_XCH.dtype)
    return out.reshape(b, 1, n, h)
