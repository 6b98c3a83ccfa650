"""HellaSwag: pick the ending of a context that the model finds most likely.

Each example (one jsonl line: ctx, endings[4], label, ...) becomes four rows `ctx + " " + ending`. The
model's per-token cross-entropy over the ending tokens gives two scores: the total loss (acc) and the
mean loss per ending token (acc_norm, fair to endings of different lengths). The ending with the lowest
score is the prediction. Examples are batched (4 rows each, right-padded; padding never influences
earlier positions under a causal mask) and split across DDP ranks, whose counts are summed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import cache_dir, download

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


class HellaSwagFormatError(ValueError):
    """A line of a HellaSwag file that is not a valid example; the message gives file and line."""


def load_examples(path: str | Path, limit: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such HellaSwag file")
    examples = []
    with open(path, "rb") as f:  # bytes, so an undecodable line is reported with its number
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break

            def bad(why: str):
                return HellaSwagFormatError(f"{path}:{lineno}: {why}")

            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise bad(f"not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue

            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise bad(f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(ex, dict):
                raise bad(f"expected a JSON object, got {type(ex).__name__}")
            for key in ("ctx", "endings", "label"):
                if key not in ex:
                    raise bad(f"missing field {key!r}")
            if not isinstance(ex["ctx"], str):
                raise bad("'ctx' must be a string")
            endings = ex["endings"]
            if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
                raise bad("'endings' must be a list of 4 strings")
            label = ex["label"]
            if isinstance(label, str) and label.isdigit():
                label = int(label)
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < 4:
                raise bad(f"'label' must be an integer 0-3, got {ex['label']!r}")
            examples.append({"ctx": ex["ctx"], "endings": endings, "label": label})
    if not examples:
        raise HellaSwagFormatError(f"{path}: no examples")
    return examples


def default_file() -> Path:
    return download(HELLASWAG_URL, cache_dir() / "hellaswag" / "hellaswag_val.jsonl", "the HellaSwag validation set",
                    "Download hellaswag_val.jsonl elsewhere and pass it with --data FILE")


def _rows(example: dict, enc, block_size: int, cut: list | None = None) -> tuple[list[list[int]], list[int]]:
    """Token rows ctx+ending for the 4 endings and where each ending starts. An ending that does not fit
    the block (with one token before it) is cut to its last tokens and counted in `cut`."""
    ctx = enc.encode_ordinary(example["ctx"])
    rows, starts = [], []
    for ending in example["endings"]:
        end = enc.encode_ordinary(" " + ending)
        row = (ctx + end)[-block_size:]  # keep the ending whole; drop the oldest context if too long
        rows.append(row)
        starts.append(max(1, len(row) - len(end)))
        if cut is not None and len(row) - starts[-1] < len(end):
            cut.append(len(end))
    return rows, starts


@torch.no_grad()
def score_batch(model, examples: list[dict], enc, device, cut: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, mean loss) per ending: two (N, 4) tensors for N examples."""
    rows, starts = [], []
    for ex in examples:
        r, s = _rows(ex, enc, model.config.block_size, cut)
        rows += r
        starts += s
    L = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)  # True where the token is part of the ending
    for i, (r, s) in enumerate(zip(rows, starts)):
        tokens[i, :len(r)] = torch.tensor(r)
        mask[i, s:len(r)] = True
    tokens, mask = tokens.to(device), mask.to(device)
    logits, _ = model(tokens)  # (4N, L, V)
    # Position t predicts token t+1.
    losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    losses = losses.view(len(rows), L - 1) * mask[:, 1:]
    total = losses.sum(1)
    mean = total / mask[:, 1:].sum(1).clamp_min(1)
    return total.view(-1, 4), mean.view(-1, 4)


def evaluate(model, path: str | Path | None = None, limit: int | None = None, batch_size: int = 8,
             device="cpu", rank: int = 0, world: int = 1, verbose: bool = True) -> dict:
    """acc and acc_norm over the file's examples (this rank takes every world-th one; counts are summed)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"--batch_size must be a positive number of examples, got {batch_size}")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be a positive number of examples, got {limit}")
    path = Path(path) if path is not None else default_file()
    examples = load_examples(path, limit)
    result = evaluate_examples(model, examples, batch_size, device, rank, world, progress=verbose and rank == 0)
    if verbose and rank == 0:
        print(f"hellaswag ({path.name}): {result['examples']} examples | acc: {result['acc']:.4f} | "
              f"acc_norm: {result['acc_norm']:.4f}")
    return result


def evaluate_examples(model, examples: list[dict], batch_size: int = 8, device="cpu", rank: int = 0,
                      world: int = 1, progress: bool = False) -> dict:
    """acc and acc_norm over loaded examples; training calls this too, so both give the same numbers."""
    from .metrics import Counter
    from .tokenizer import get_encoding

    mine = examples[rank::world]
    enc = get_encoding()
    model.eval()
    counts = torch.zeros(3, dtype=torch.long, device=device)  # correct (acc), correct (acc_norm), examples
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else None
    cut: list[int] = []
    # Rank 0's share, scaled to the whole file: ranks run in step.
    bar = Counter(len(examples), "hellaswag", "examples") if progress else None
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        if autocast is not None:
            with autocast:
                total, mean = score_batch(model, chunk, enc, device, cut)
        else:
            total, mean = score_batch(model, chunk, enc, device, cut)
        labels = torch.tensor([ex["label"] for ex in chunk], device=device)
        counts[0] += (total.argmin(1) == labels).sum()
        counts[1] += (mean.argmin(1) == labels).sum()
        counts[2] += len(chunk)
        if bar is not None:
            bar.update(len(chunk) * world)
    if bar is not None:
        bar.close()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(counts)
    if cut:
        import sys

        print(f"warning: rank {rank}: {len(cut)} ending(s) of up to {max(cut)} tokens do not fit the model's "
              f"{model.config.block_size}-token block; only their last {model.config.block_size - 1} tokens "
              f"were scored", file=sys.stderr)
    n = int(counts[2])
    return {"examples": n, "acc": int(counts[0]) / n, "acc_norm": int(counts[1]) / n}
