"""The `fastgpt` command (also `python -m fastgpt`): prepare, train, generate, eval, validate, plot, export."""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch sees no CUDA GPU; use --device cpu")
    return name


def _check_model_args(args) -> None:
    """The model flags' errors that need no torch: callers check them before importing it (seconds)."""
    if bool(args.checkpoint) == bool(args.model):
        raise ValueError("give exactly one of --checkpoint log/model_NNNNN.pt or --model gpt2|DIR")
    if args.checkpoint:
        _require_checkpoint(args.checkpoint)


def _load_model(args, device: str):
    """--checkpoint (a training checkpoint) or --model (a HF hub name or local directory)."""
    _check_model_args(args)
    if args.checkpoint:
        from .checkpoint import load_model

        return load_model(args.checkpoint, device, kernels=args.kernels)
    from .model import GPT

    return GPT.from_pretrained(args.model, kernels=args.kernels).to(device).eval()


def _require_checkpoint(path: str) -> None:
    """A missing checkpoint named with what its directory does hold (newest first), so the fix is one paste."""
    from pathlib import Path

    p = Path(path)
    if p.exists():
        return
    there = sorted(p.parent.glob("*.pt"), key=lambda f: f.name, reverse=True) if p.parent.is_dir() else []
    if not there:
        raise FileNotFoundError(f"no such checkpoint {path}: {p.parent}/ holds no .pt files")
    names = ", ".join(str(f) for f in there[:5]) + (f" (and {len(there) - 5} more)" if len(there) > 5 else "")
    raise FileNotFoundError(f"no such checkpoint {path}; the newest in {p.parent}/ is {there[0]} "
                            f"(there: {names})")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="a training checkpoint, e.g. log/model_01000.pt")
    p.add_argument("--model", help="HuggingFace GPT-2 weights instead: gpt2 ... gpt2-xl, or a local directory")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastgpt", description="GPT-2 from scratch on Triton kernels.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{prepare,train,generate,eval,validate,plot,export}")

    prep = sub.add_parser("prepare", help="tokenize a dataset into .npy shards")
    psub = prep.add_subparsers(dest="source", required=True)
    s = psub.add_parser("shakespeare", help="Tiny Shakespeare (packaged with fastgpt: works offline)")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--input", help="a local copy of the Tiny Shakespeare input.txt instead of the packaged one")
    src.add_argument("--download", action="store_true", help="fetch input.txt from the network instead")
    src.add_argument("--url", help="fetch this URL instead (implies --download)")
    s.add_argument("--out", default="shakespeare_data")
    t = psub.add_parser("text", help="your own UTF-8 text files")
    t.add_argument("files", nargs="+")
    t.add_argument("--out", required=True)
    t.add_argument("--val_fraction", type=float, default=0.1)
    t.add_argument("--shard_tokens", type=int, default=None, help="tokens per shard file (default: one shard)")
    t.add_argument("--num_proc", type=int, default=1,
                   help="tokenizer worker processes; an interrupted preparation resumes when run again")
    h = psub.add_parser("hf", help="a HuggingFace dataset, streamed (needs `pip install fastgpt[hf]` and a network)")
    h.add_argument("dataset", help="e.g. HuggingFaceFW/fineweb-edu")
    h.add_argument("--name", default=None, help="dataset configuration, e.g. sample-10BT")
    h.add_argument("--split", default="train")
    h.add_argument("--text_field", default="text")
    h.add_argument("--out", required=True)
    h.add_argument("--no_streaming", action="store_true",
                   help="download the whole dataset first and split it --val_fraction (the pre-streaming behaviour)")
    h.add_argument("--val_fraction", type=float, default=0.1, help="with --no_streaming: the last fraction is val")
    h.add_argument("--limit", type=int, default=None, help="use only the first N documents")
    f = psub.add_parser("files", help="local .parquet, .jsonl(.gz), .json.gz or .arrow files or directories")
    f.add_argument("files", nargs="+")
    f.add_argument("--out", required=True)
    f.add_argument("--text_field", default="text")
    f.add_argument("--part", default=None, help="i/N: prepare the i-th of N slices of the files (N parallel jobs)")
    for a in (h, f):
        a.add_argument("--shard_tokens", type=int, default=None, help="tokens per shard (default 100,000,000)")
        a.add_argument("--val_tokens", type=int, default=None,
                       help="the first N tokens are the val split (default: one shard)")
        a.add_argument("--num_proc", type=int, default=None,
                       help="tokenizer worker processes (default: the cores); a killed preparation resumes when run again")

    sub.add_parser("train", help="train (the flags of train.py; see `fastgpt train --help`)", add_help=False)

    g = sub.add_parser("generate", help="sample text from a checkpoint or HF model")
    _add_model_args(g)
    g.add_argument("--prompt", default="\n")
    g.add_argument("--max_new_tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding")
    g.add_argument("--top_k", type=int, default=50, help="sample among the k likeliest tokens (0: all)")
    g.add_argument("--num_samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--no_cache", action="store_true", help="recompute the whole context for each token")

    e = sub.add_parser("eval", help="evaluate a model on a benchmark")
    esub = e.add_subparsers(dest="benchmark", required=True)
    hs = esub.add_parser("hellaswag", help="HellaSwag validation accuracy (acc, acc_norm)")
    _add_model_args(hs)
    hs.add_argument("--data", help="a hellaswag jsonl file (default: download the validation set)")
    hs.add_argument("--limit", type=int, default=None, help="only the first N examples")
    hs.add_argument("--batch_size", type=int, default=8, help="examples per forward pass (4 rows each)")

    v = sub.add_parser("validate", help="compare fastgpt with transformers on the same weights")
    v.add_argument("--model", required=True, help="gpt2 ... gpt2-xl or a local HF directory")
    v.add_argument("--prompt", default="Hello world")
    v.add_argument("--max_new_tokens", type=int, default=20)
    v.add_argument("--tol", type=float, default=None,
                   help="largest allowed |logit difference| (default 1e-3; 2e-2 with Triton kernels, TF32 dots)")
    v.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    v.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch"))

    pl = sub.add_parser("plot", help="plot train/val loss (and HellaSwag) of one or more runs")
    pl.add_argument("logs", nargs="+", help="log directories (or their metrics.jsonl files)")
    pl.add_argument("--out", default="loss.png", help="image file; .png, .svg or .pdf")
    pl.add_argument("--labels", nargs="+", default=None, help="legend names, one per log (default: the paths)")

    x = sub.add_parser("export", help="write a checkpoint as a HuggingFace directory or a safetensors file")
    x.add_argument("--checkpoint", required=True, help="a training checkpoint, e.g. log/model_01000.pt")
    x.add_argument("--out", required=True, help="directory (--format hf) or file (--format safetensors)")
    x.add_argument("--format", default="hf", choices=("hf", "safetensors"),
                   help="hf: config.json + model.safetensors + tokenizer files; safetensors: the weights only")
    return p


def _prepare(args) -> int:
    from . import data

    if args.source == "shakespeare":
        url = args.url or (data.SHAKESPEARE_URL if args.download else None)
        data.prepare_shakespeare(args.input, args.out, download_url=url)
    elif args.source == "text":
        data.prepare_texts(args.files, args.out, args.val_fraction, args.shard_tokens, num_proc=args.num_proc)
    elif args.source == "hf" and args.no_streaming:
        data.prepare_hf(args.dataset, args.out, name=args.name, split=args.split, text_field=args.text_field,
                        val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, limit=args.limit,
                        num_proc=args.num_proc or 1)
    else:
        size = dict(shard_tokens=args.shard_tokens or data.DEFAULT_SHARD_TOKENS, val_tokens=args.val_tokens,
                    num_proc=args.num_proc)
        if args.source == "hf":
            data.prepare_hf_stream(args.dataset, args.out, name=args.name, split=args.split,
                                   text_field=args.text_field, limit=args.limit, **size)
        else:
            data.prepare_files(args.files, args.out, text_field=args.text_field, part=args.part, **size)
    print(f"wrote {args.out}/")
    return 0


def _generate(args) -> int:
    if args.num_samples <= 0:
        raise ValueError(f"--num_samples must be positive, got {args.num_samples}")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k < 0:
        raise ValueError(f"--top_k must be >= 0 (0: all tokens), got {args.top_k}")
    _check_model_args(args)
    import torch

    from .generate import PromptCroppedWarning
    from .tokenizer import EOT_TOKEN, get_encoding

    device = _device(args.device)
    model = _load_model(args, device)
    enc = get_encoding()
    ids = enc.encode_ordinary(args.prompt) or [EOT_TOKEN]
    block = model.config.block_size
    if len(ids) > block:
        print(f"warning: the prompt is {len(ids):,} tokens, longer than the model's block_size {block}: only its "
              f"last {block} tokens are used", file=sys.stderr)
    idx = torch.tensor([ids] * args.num_samples, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with warnings.catch_warnings():  # said above, once, as a plain line
        warnings.simplefilter("ignore", PromptCroppedWarning)
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                             use_cache=not args.no_cache, generator=gen)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(enc.decode(out[i].tolist()))
    return 0


def _eval(args) -> int:
    _check_model_args(args)
    import torch
    import torch.distributed as dist

    from .hellaswag import evaluate

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0)) if world > 1 else 0
    device = _device(args.device)
    if world > 1:
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        model = _load_model(args, device)
        evaluate(model, args.data, args.limit, args.batch_size, device, rank, world)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


def _plot(args) -> int:
    from .plot import plot_runs

    if args.labels is not None and len(args.labels) != len(args.logs):
        raise ValueError(f"--labels gives {len(args.labels)} names for {len(args.logs)} logs")
    plot_runs(args.logs, args.out, args.labels)
    print(f"wrote {args.out}")
    return 0


def _export(args) -> int:
    from .export import export

    out = export(args.checkpoint, args.out, args.format)
    if args.format == "hf":
        print(f"wrote {out}/ (config.json, model.safetensors, tokenizer files): load it with "
              f"transformers' AutoTokenizer / GPT2LMHeadModel.from_pretrained({str(out)!r})")
    else:
        print(f"wrote {out} (weights only; fastgpt.export.load_safetensors reads it back)")
    return 0


def _validate(args) -> int:
    from .validate import run

    return run(args.model, args.prompt, args.max_new_tokens, args.tol, _device(args.device), args.kernels)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from .train import main as train_main

        return train_main(argv[1:], prog="fastgpt train")
    args = build_parser().parse_args(argv)
    try:
        return {"prepare": _prepare, "generate": _generate, "eval": _eval, "validate": _validate, "plot": _plot,
                "export": _export}[args.command](args)
    except (ValueError, OSError, RuntimeError) as e:
        if os.environ.get("FASTGPT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
