"""``loopjax aot`` over the BENCHMARKS.md grid: Ouro-1.4B / 2.6B x seq 1024..8192 x v5p:2x2x4, v5e:4x4, v6e:4x4
(global batch 16, FSDP over the 16 chips), a pod-scale row and the seq-32768 target row.

    python -m benchmarks.aot_table [--only 1_4b:4096:v5p] [--cost fit|none] [--jsonl PATH] [--table-from PATH]

Each row runs ``python -m loopjax.cli aot ... --json`` in a subprocess (one at a time: every row compiles for
minutes on a small CPU host); results are appended to ``--jsonl`` as they come, so an interrupted run keeps its
rows and a rerun skips the rows already there. Prints one table at the end (``--table-from`` only prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from loopjax.aot import format_table

MODELS = ("ouro_1_4b", "ouro_2_6b")
SEQS = (1024, 2048, 4096, 8192)
TOPOLOGIES = ("v5p:2x2x4", "v5e:4x4", "v6e:4x4")


def grid() -> list[dict]:
    """Every row: preset, topology, slices, seq, batch, mesh."""
    rows = [dict(model=m, topology=t, slices=1, seq=s, batch=16, mesh="fsdp=16")
            for m in MODELS for t in TOPOLOGIES for s in SEQS]
    # the targets' long-context row, and a pod: 2 slices of v5p-256 (128 chips), one row per chip
    rows.append(dict(model="ouro_1_4b", topology="v5p:2x2x4", slices=1, seq=32768, batch=16, mesh="fsdp=16"))
    rows.append(dict(model="ouro_1_4b", topology="v5p:4x4x8", slices=2, seq=4096, batch=256, mesh="data=2,fsdp=128"))
    return rows


def row_id(row: dict) -> str:
    short = row["model"].replace("ouro_", "")
    return f"{short}:{row['seq']}:{row['topology'].split(':')[0]}:{row['topology']}x{row['slices']}"


def run_row(row: dict, cost: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "row.json")
        cmd = [sys.executable, "-m", "loopjax.cli", "aot", row["model"], "--topology", row["topology"],
               "--num-slices", str(row["slices"]), "--seq", str(row["seq"]), "--batch", str(row["batch"]),
               "--mesh", row["mesh"], "--cost", cost, "--json", path, *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        command = "loopjax aot " + " ".join(cmd[4:-2])
        if proc.returncode != 0 or not os.path.exists(path):
            return {**row, "id": row_id(row), "command": command, "error": proc.stderr.strip().splitlines()[-3:],
                    "wall_s": wall}
        with open(path) as f:
            return {**json.load(f), "model": row["model"], "id": row_id(row), "command": command, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", default=[], help="substring of a row id (model:seq:gen:topology)")
    p.add_argument("--cost", choices=("fit", "none"), default="fit", help="fit: memory + est MFU; none: memory")
    p.add_argument("--jsonl", default="benchmarks/results/aot_table.jsonl")
    p.add_argument("--table-from", action="store_true", help="only print the table of --jsonl")
    p.add_argument("--json", default=None, help="also write all rows as one JSON list")
    p.add_argument("extra", nargs="*", help="overrides passed to every row, e.g. model.remat_policy=save_dots")
    args = p.parse_args(argv)
    done = []
    if os.path.exists(args.jsonl):
        with open(args.jsonl) as f:
            done = [json.loads(line) for line in f if line.strip()]
    if not args.table_from:
        os.makedirs(os.path.dirname(args.jsonl) or ".", exist_ok=True)
        have = {(r["id"], r.get("costing", {}).get("mode", "none"), tuple(r.get("overrides", ()))) for r in done
                if "error" not in r}
        for row in grid():
            if args.only and not any(o in row_id(row) for o in args.only):
                continue
            if (row_id(row), args.cost, tuple(args.extra)) in have:
                continue
            print(f"aot_table: {row_id(row)} ...", file=sys.stderr, flush=True)
            result = {**run_row(row, args.cost, args.extra), "overrides": args.extra}
            done.append(result)
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"aot_table: {row_id(row)}: {result.get('error') or 'ok'} ({result['wall_s']:.0f} s)",
                  file=sys.stderr, flush=True)
    ok = [r for r in done if "error" not in r]
    print(format_table(ok, extra=(("model", "model", "{}"), ("slices", "num_slices", "{}"))))
    for r in done:
        if "error" in r:
            print(f"failed: {r['id']}: {r['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(done, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
