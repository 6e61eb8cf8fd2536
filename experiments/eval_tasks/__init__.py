"""lm-evaluation-harness tasks over the project's reasoning families (p-hop, n-ary addition, i-GSM) rendered as
text: ``python -m experiments.eval_tasks.make --out DIR`` writes the JSONL data and the task YAMLs that read it."""
