"""`fastgpt export`: a training checkpoint out to formats other tools load.

`--format hf` (default) writes a HuggingFace directory: config.json + model.safetensors (fastgpt.hf's
layout conversion) and the GPT-2 tokenizer files. Those come from the offline encoding's own data
(fastgpt.tokenizer): HF's `vocab.json` is OpenAI's `encoder.json` and HF's `merges.txt` is OpenAI's
`vocab.bpe`, byte for byte, and both are checked against tiktoken's sha256 before they are copied. So
`AutoTokenizer.from_pretrained(dir)` and `GPT2LMHeadModel.from_pretrained(dir)` work with no network.

`--format safetensors` writes only the weights, one file, under fastgpt's own parameter names (the
tied lm_head.weight left out: it is transformer.wte.weight) with the GPTConfig in the metadata;
`load_safetensors` reads it back into a GPT.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

FORMATS = ("hf", "safetensors")


def save_tokenizer(out: str | Path, model_max_length: int = 1024) -> list[Path]:
    """GPT-2 tokenizer files for transformers (slow and fast tokenizers both build from them)."""
    from .tokenizer import EOT_TOKEN, _data_dir, get_encoding

    enc = get_encoding()  # verifies the sha256 of both files before we copy them
    eot = enc.decode([EOT_TOKEN])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = _data_dir()
    written = []
    for name, dest in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        shutil.copyfile(src / name, out / dest)
        written.append(out / dest)
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
              "add_prefix_space": False, "add_bos_token": False, **special}
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")
        written.append(out / name)
    return written


def export_hf(model, out: str | Path) -> Path:
    out = Path(out)
    model.save_pretrained(str(out))
    save_tokenizer(out, model.config.block_size)
    return out


def export_safetensors(model, out: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    cfg = {k: v for k, v in asdict(model.config).items() if k != "kernels"}
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    save_file(state, str(tmp), metadata={"format": "pt", "fastgpt_config": json.dumps(cfg)})
    os.replace(tmp, out)
    return out


def load_safetensors(path: str | Path, **overrides):
    """A GPT from a file written by export_safetensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .config import GPTConfig
    from .model import GPT

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "fastgpt_config" not in meta:
        raise ValueError(f"{path}: no fastgpt_config in its metadata (not written by `fastgpt export`)")
    model = GPT(GPTConfig(**{**json.loads(meta["fastgpt_config"]), **overrides}))
    state = load_file(str(path))
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied
    model.load_state_dict(state)
    return model


def export(checkpoint: str | Path, out: str | Path, fmt: str = "hf") -> Path:
    from .checkpoint import load_model

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    model = load_model(checkpoint, "cpu", kernels="torch")
    if fmt == "hf":
        out_path = Path(out)
        if out_path.exists() and not out_path.is_dir():
            raise ValueError(f"--out {out}: exists and is not a directory")
        return export_hf(model, out_path)
    return export_safetensors(model, out)
