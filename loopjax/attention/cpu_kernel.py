"""Flash attention for XLA:CPU as a C++ FFI kernel (``cpu_flash.cc``), built with the host's C++ compiler on
first use.

XLA:CPU runs the pure-JAX chunked kernel's small attention GEMMs well below its square-matmul rate and fuses
the backward's transposes of the [block_q, block_k] tiles into elementwise work (BENCHMARKS.md, "Train step");
this kernel keeps each tile in cache through scores, softmax and both products, forward and backward. Same
mask, inputs and result as ``chunked_attention``; float32 inside (other dtypes are cast at the boundary).

``available()`` builds the library once per machine into ``$LOOPJAX_CACHE_DIR`` (default
``~/.cache/loopjax``), keyed by the source, jaxlib's FFI headers, the compiler and flags, and the host, and
registers its handlers. It returns False, logging why, where there is no compiler or the build fails; "auto" then uses
"chunked". ``LOOPJAX_CPU_KERNEL=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.attention._checks import check_block, check_inputs

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_flash.cc")
_FWD, _BWD = "loopjax_flash_fwd", "loopjax_flash_bwd"
# Tile sizes: the [BLOCK_Q, BLOCK_K] float32 scores and their gradient (64 KiB each) stay in L2 beside the
# q / k / v rows they are made from.
BLOCK_Q, BLOCK_K = 128, 128


def _flag_sets() -> list[list[str]]:
    base = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-shared", "-fPIC", "-std=c++17"]
    native = ["-mcpu=native"] if platform.machine().lower() in ("arm64", "aarch64") else ["-march=native"]
    return [base + native, base]


def _cache_dir() -> Path:
    root = os.environ.get("LOOPJAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "loopjax")
    return Path(root) / "ffi"


def find_compiler() -> str | None:
    """The C++ compiler the kernel is built with: ``$CXX``, else c++, g++ or clang++ on the PATH."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _build() -> Path:
    """Compile cpu_flash.cc (cached); raises RuntimeError with the compiler's message on failure."""
    cxx = find_compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    include = jax.ffi.include_dir()
    # the key: the source, the FFI headers it is compiled against, the compiler and flags, and the host
    # (-march=native code must not travel through a shared home directory)
    parts = [SOURCE.read_bytes(), *(p.read_bytes() for p in sorted(Path(include, "xla", "ffi", "api").glob("*.h"))),
             platform.node().encode()]
    errors = []
    for flags in _flag_sets():
        key = hashlib.sha256(b"\0".join([*parts, " ".join([cxx, *flags]).encode()])).hexdigest()[:16]
        lib = _cache_dir() / f"cpu_flash-{key}.so"
        if lib.exists():
            return lib
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        cmd = [cxx, *flags, "-I", include, str(SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0:
            os.replace(tmp, lib)  # atomic: concurrent builders (test workers) each publish a whole file
            return lib
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[-2000:]}")
    raise RuntimeError("building the CPU attention kernel failed:\n" + "\n".join(errors))


_registered = False


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered for XLA:CPU (built on the first call)."""
    global _registered
    if os.environ.get("LOOPJAX_CPU_KERNEL", "1") == "0":
        log.info("CPU attention kernel off (LOOPJAX_CPU_KERNEL=0)")
        return False
    if _registered:
        return True
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(lib.LoopjaxFlashFwd), platform="cpu")
        jax.ffi.register_ffi_target(_BWD, jax.ffi.pycapsule(lib.LoopjaxFlashBwd), platform="cpu")
    except (RuntimeError, OSError, AttributeError, subprocess.TimeoutExpired) as e:
        log.warning("CPU attention kernel unavailable, using 'chunked': %s", e)
        return False
    _registered = True
    return True


def cpu_flash_attention(
    q_BSNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    *,
    q_positions_BS: jax.Array,
    kv_positions_BT: jax.Array,
    q_segment_ids_BS: jax.Array | None = None,
    kv_segment_ids_BT: jax.Array | None = None,
    sliding_window: int | None = None,
    scale: float | None = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> jax.Array:
    """Masked softmax attention on XLA:CPU; arguments and result as ``chunked_attention`` (``block_q`` /
    ``block_k``: the kernel's tile). Needs ``available()``. Reverse mode only (custom_vjp)."""
    check_inputs(q_BSNH, k_BTKH, v_BTKH, q_positions_BS, kv_positions_BT, q_segment_ids_BS, kv_segment_ids_BT,
                 sliding_window, position_names=("q_positions_BS", "kv_positions_BT"))
    check_block("block_q", block_q)
    check_block("block_k", block_k)
    if not available():
        raise RuntimeError("the CPU attention kernel is not available here (see the log); use chunked_attention")
    b, s, _, h = q_BSNH.shape
    t = k_BTKH.shape[1]
    has_seg = q_segment_ids_BS is not None
    attrs = dict(scale=np.float32(h**-0.5 if scale is None else scale), window=np.int64(sliding_window or 0),
                 has_seg=has_seg, block_q=np.int64(block_q), block_k=np.int64(block_k))
    ids = (q_positions_BS.astype(jnp.int32), kv_positions_BT.astype(jnp.int32),
           (q_segment_ids_BS if has_seg else jnp.zeros((b, s))).astype(jnp.int32),
           (kv_segment_ids_BT if has_seg else jnp.zeros((b, t))).astype(jnp.int32))
    f32 = [x.astype(jnp.float32) for x in (q_BSNH, k_BTKH, v_BTKH)]
    return _flash(tuple(sorted(attrs.items())), *f32, *ids).astype(q_BSNH.dtype)


def _call(name: str, outs, args, attrs):
    return jax.ffi.ffi_call(name, outs, vmap_method="sequential")(*args, **dict(attrs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(attrs, q, k, v, qpos, kpos, qseg, kseg):
    return _flash_fwd(attrs, q, k, v, qpos, kpos, qseg, kseg)[0]


def _flash_fwd(attrs, q, k, v, qpos, kpos, qseg, kseg):
    b, s, n, _ = q.shape
    out, lse = _call(_FWD, (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, n, s), jnp.float32)),
                     (q, k, v, qpos, kpos, qseg, kseg), attrs)
    return out, (q, k, v, out, lse, qpos, kpos, qseg, kseg)


def _flash_bwd(attrs, res, dout):
    q, k, v, out, lse, qpos, kpos, qseg, kseg = res
    dq, dk, dv = _call(_BWD, tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
                       (q, k, v, out, lse, dout.astype(jnp.float32), qpos, kpos, qseg, kseg), attrs)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
