"""The Colab notebooks in colabs/: each runs top to bottom on CPU in SMOKE mode, and is committed clean.

The execution test starts a fresh ``python3`` kernel per notebook (nbclient) with ``SMOKE=1`` and
``JAX_PLATFORMS=cpu``, in a temporary working directory so nothing is written into the repository, and fails on
the first cell that raises. The kernel inherits conftest's 8 host CPU devices, so the data-parallel mesh of the
notebooks really spans 8 devices, as on a Colab TPU v2-8 / v3-8 runtime. The SMOKE sizes keep each notebook
near half a minute on a 2-core CI machine, most of it XLA compilation.
"""

import ast
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
COLABS = ROOT / "colabs"
NOTEBOOKS = ["01_quickstart", "02_adaptive_halting", "03_ouro_inference", "04_fixed_points", "05_think_or_know",
             "06_eval_by_depth"]
MAX_FUNCTION_LINES = 15  # notebooks call the library; longer code belongs in loopjax/


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(COLABS / f"{name}.ipynb", as_version=4)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> Path:
    """One persistent XLA compilation cache for all notebook kernels of the session (same programs compile once)."""
    return tmp_path_factory.mktemp("jax_cache")


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom_in_smoke_mode(name, tmp_path, compile_cache):
    nb = _read(name)
    env = dict(os.environ, SMOKE="1", JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(compile_cache))
    # tiny programs: XLA's backend optimisations cost more compile time than they save at run time
    env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    env.pop("MPLBACKEND", None)  # the kernel's inline backend, as in Colab
    # this checkout's packages (loopjax, and experiments: 06 imports the shipped eval tasks, as Colab's clone does)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # the kernelspec runs "python" from PATH: make it this interpreter, which has loopjax installed
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    before = sorted(p.name for p in COLABS.iterdir())
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError naming the failing cell
    assert sorted(p.name for p in COLABS.iterdir()) == before
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{name}: expected at least one plot"


def _long_functions(source: str) -> list[str]:
    long = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            n_lines = node.end_lineno - node.lineno + 1
            if n_lines > MAX_FUNCTION_LINES:
                long.append(f"{getattr(node, 'name', 'lambda')} ({n_lines} lines)")
    return long


def test_notebooks_are_stored_clean_and_define_only_short_functions():
    assert sorted(p.stem for p in COLABS.glob("*.ipynb")) == NOTEBOOKS
    readme = (ROOT / "README.md").read_text()
    for name in NOTEBOOKS:
        nb = _read(name)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and "import loopjax" in code[0].source and "jax.devices()" in code[0].source
        for i, cell in enumerate(code):
            assert cell.outputs == [], f"{name} code cell {i}: stored outputs"
            assert cell.execution_count is None, f"{name} code cell {i}: stored execution count"
            assert not _long_functions(cell.source), f"{name} code cell {i}: {_long_functions(cell.source)}"
        assert f"colabs/{name}.ipynb" in readme, f"README.md: no Open in Colab badge for {name}"


def test_long_function_check_counts_definition_lines():
    short = "def f(x):\n" + "    x += 1\n" * 14
    assert _long_functions(short) == []
    assert _long_functions(short + "    return x\n") == ["f (16 lines)"]
