"""p-hop induction (4 hops) with a tiny looped model trained on the Ouro objective.

    loopjax train tiny_phop --workdir runs/tiny_phop
"""

import loopjax as lj
from loopjax.config import HaltingConfig, TrainConfig
from loopjax.train.experiment import DataConfig, Experiment


def get_config() -> Experiment:
    model = lj.tiny(vocab_size=32, d_model=64, n_layers=2, n_loops=4, max_seq_len=64)
    train = TrainConfig(steps=500, batch_size=16, seq_len=40, learning_rate=1e-3, warmup_steps=50,
                        objective=HaltingConfig(objective="ouro", beta=0.05), log_every=25, eval_every=100,
                        eval_batches=4, ckpt_every=100)
    data = DataConfig(source="phop", task=dict(alphabet=4, n=32, hops=(4,)))
    return Experiment(model=model, train=train, data=data)
