"""Continue training an Ouro checkpoint on your own text with the Ouro objective, then evaluate per loop depth.

    export OURO_DIR=/path/to/Ouro-1.4B     # HF folder: config.json, model.safetensors, tokenizer.json (+ config)
    loopjax data prepare my_texts/ --tokenizer $OURO_DIR --out corpus
    loopjax convert import $OURO_DIR ouro_continue --workdir runs/ouro_continue --set data.prepared=corpus
    loopjax train ouro_continue --workdir runs/ouro_continue --set data.prepared=corpus
    loopjax eval runs/ouro_continue --data corpus

The model is read from ``$OURO_DIR/config.json`` (the Ouro-1.4B preset when OURO_DIR is unset), so it matches
the imported step-0 checkpoint; ``data.prepared`` names the corpus folder (default ``corpus``).
"""

import os

import loopjax as lj
from loopjax.config import HaltingConfig, TrainConfig
from loopjax.train.experiment import DataConfig, Experiment


def get_config() -> Experiment:
    ouro_dir = os.environ.get("OURO_DIR")
    if ouro_dir:
        from loopjax.convert.ouro import ouro_config, read_hf_config

        model = ouro_config(read_hf_config(ouro_dir))
    else:
        model = lj.ouro_1_4b()
    train = TrainConfig(steps=1000, batch_size=8, seq_len=min(1024, model.max_seq_len), learning_rate=3e-5,
                        schedule="cosine", warmup_steps=50, weight_decay=0.1, grad_clip=1.0,
                        # chunked: no [T, B, S, V] logits (6 GB at these sizes); the head + CE run in blocks
                        objective=HaltingConfig(objective="ouro", beta=0.1, chunked=True), log_every=10,
                        eval_every=200, eval_batches=4, ckpt_every=200)
    data = DataConfig(source="tokens", prepared="corpus")
    return Experiment(model=model, train=train, data=data)
