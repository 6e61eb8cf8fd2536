"""A tiny byte-level LM on the repository's own text files: trains in a minute on a CPU, no download.

    loopjax train tiny_text --workdir runs/tiny_text
    loopjax train tiny_text --set train.steps=50 --set model.n_loops=2
"""

import loopjax as lj
from loopjax.config import HaltingConfig, TrainConfig
from loopjax.train.experiment import DataConfig, Experiment


def get_config() -> Experiment:
    model = lj.tiny(vocab_size=258, d_model=64, n_layers=2, n_loops=4, max_seq_len=128, norm_scheme="sandwich",
                    step_norm=True)
    train = TrainConfig(steps=300, batch_size=8, seq_len=128, learning_rate=3e-3, warmup_steps=30,
                        objective=HaltingConfig(objective="ouro", beta=0.05), log_every=10, eval_every=100,
                        eval_batches=2, ckpt_every=100)
    data = DataConfig(source="text", paths=("README.md", "loopjax/**/*.py"), eval_fraction=0.05)
    return Experiment(model=model, train=train, data=data)
