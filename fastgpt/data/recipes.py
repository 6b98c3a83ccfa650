"""Named flag sets for known runs: `--recipe NAME` fills these TrainConfig fields (flags given on the
command line still win).

gpt2-124m-fineweb is build-nanogpt's GPT-2 124M run on FineWeb-Edu sample-10BT: 2**19 = 524,288 tokens
a step (0.5M, GPT-3 small's batch) at T=1024, 19,073 steps (10B tokens / 524,288 = one epoch), 715
warm-up steps, cosine from 6e-4 to 6e-5, weight decay 0.1, val and HellaSwag every 250 steps,
checkpoints every 5,000. Its data directory is prepared by
`fastgpt prepare hf HuggingFaceFW/fineweb-edu --name sample-10BT --out edu_fineweb10B`.
The reference curve (stated in docs/data.md, not asserted anywhere) is build-nanogpt's published one.
"""
from __future__ import annotations

RECIPES: dict[str, dict[str, object]] = {
    "gpt2-124m-fineweb": {
        "model": "gpt2",
        "data_root": "edu_fineweb10B",
        "total_batch_size": 524_288,
        "seq_len": 1024,
        "micro_batch_size": 64,  # 64 x 1024 fits an 80 GB GPU; lower it on smaller ones (accumulation keeps the step)
        "max_lr": 6e-4,
        "min_lr_ratio": 0.1,
        "warmup_steps": 715,
        "max_steps": 19_073,
        "weight_decay": 0.1,
        "grad_clip": 1.0,
        "eval_interval": 250,
        "hellaswag_interval": 250,
        "checkpoint_interval": 5_000,
        "sample_prompt": "Hello, I'm a language model,",
    },
}


def recipe(name: str) -> dict[str, object]:
    from .shards import DataError

    if name not in RECIPES:
        raise DataError(f"--recipe {name!r} is not known; known recipes: {', '.join(sorted(RECIPES))}")
    return dict(RECIPES[name])
