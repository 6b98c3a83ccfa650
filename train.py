"""Entry point for `python train.py` and `torchrun --standalone --nproc_per_node=N train.py`."""
from fastgpt.train import main

if __name__ == "__main__":
    main()
