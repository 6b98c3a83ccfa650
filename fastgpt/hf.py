"""HuggingFace GPT-2 import and export.

HF's GPT-2 uses `Conv1D` layers whose weights are stored (in_features, out_features), the transpose
of `nn.Linear`; everything else is a name-for-name copy. The lm_head is tied to wte in both.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import GPTConfig

# Weights stored transposed by HF's Conv1D.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# Seconds to wait for the hub's first answer. snapshot_download asks the hub which revision to fetch with no
# timeout at all (huggingface_hub 2.x passes timeout=None), so a hub that accepts connections and never
# answers (a firewall that swallows packets, a dead proxy) kept `validate --model gpt2` silent for minutes.
HUB_TIMEOUT_S = 5


def _config_from_hf(d: dict, path: Path) -> dict:
    if d.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{path}: model_type {d.get('model_type')!r} is not gpt2")
    act = d.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{path}: activation_function {act!r} is not supported (fastgpt uses tanh GELU)")
    eps = d.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise ValueError(f"{path}: layer_norm_epsilon {eps} is not supported (fastgpt uses 1e-5)")
    return dict(
        block_size=d.get("n_positions", d.get("n_ctx", 1024)),
        vocab_size=d["vocab_size"],
        n_layer=d["n_layer"],
        n_head=d["n_head"],
        n_embd=d["n_embd"],
        bias=True,
    )


def _resolve(name_or_dir: str) -> Path:
    """A local directory as is, or a hub id downloaded (config.json + weights) to the HF cache."""
    p = Path(name_or_dir).expanduser()
    if p.is_dir():
        return p
    # Hub ids are "name" or "org/name"; anything else that is not a directory is a bad local path.
    if p.exists() or name_or_dir.startswith((".", "/", "~")) or name_or_dir.count("/") > 1:
        raise FileNotFoundError(f"{name_or_dir}: not a directory holding config.json and model weights")
    repo = name_or_dir if "/" in name_or_dir or name_or_dir not in HUB_NAMES else f"openai-community/{name_or_dir}"
    try:
        local = _download(repo)
    except Exception as e:
        raise RuntimeError(
            f"could not fetch {name_or_dir!r} from the HuggingFace hub at "
            f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co')} ({type(e).__name__}: {e}). "
            f"Offline? Pass a local directory instead, e.g. one written by "
            f"transformers' GPT2LMHeadModel.save_pretrained(dir) or by fastgpt's model.save_pretrained(dir)."
        ) from e
    return Path(local)


def _download(repo: str) -> str:
    """config.json + weights of `repo` into the HF cache (its snapshot directory). Every first ask is bounded
    by HUB_TIMEOUT_S: the revision, then each file's metadata (one attempt; hf_hub_download alone retries a
    silent hub for minutes, and snapshot_download also lists the repository with no timeout). A hub that
    does not answer in time falls back to the cache, as snapshot_download itself does offline."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download

    files = ["config.json", "model.safetensors"]
    try:
        sha = HfApi().repo_info(repo, timeout=HUB_TIMEOUT_S).sha
    except Exception as e:
        try:
            return snapshot_download(repo, allow_patterns=files, local_files_only=True)
        except Exception:
            raise e from None
    paths = []
    for f in files:
        try:
            paths.append(hf_hub_download(repo, f, revision=sha, local_files_only=True))  # cached at that commit
            continue
        except Exception:
            pass
        get_hf_file_metadata(hf_hub_url(repo, f, revision=sha), timeout=HUB_TIMEOUT_S)
        paths.append(hf_hub_download(repo, f, revision=sha, etag_timeout=HUB_TIMEOUT_S))
    return str(Path(paths[0]).parent)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    st = path / "model.safetensors"
    if st.exists():
        from safetensors.torch import load_file

        return load_file(str(st))
    binf = path / "pytorch_model.bin"
    if binf.exists():
        return torch.load(binf, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def load_pretrained(cls, name_or_dir: str, **overrides):
    path = _resolve(name_or_dir)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json")
    config = GPTConfig(**{**_config_from_hf(json.loads(cfg_file.read_text()), cfg_file), **overrides})
    model = cls(config)
    hf = _load_state(path)
    hf = {(k if k.startswith("transformer.") or k.startswith("lm_head.") else f"transformer.{k}"): v
          for k, v in hf.items()}
    # Old checkpoints carry the causal mask as buffers; they are not parameters.
    hf = {k: v for k, v in hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    hf.pop("lm_head.weight", None)  # tied to wte

    sd = model.state_dict()
    ours = [k for k in sd if k != "lm_head.weight"]
    missing = [k for k in ours if k not in hf]
    unexpected = [k for k in hf if k not in sd]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match GPT-2 {config}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k in ours:
            w = hf[k].t() if k.endswith(_CONV1D) else hf[k]
            if w.shape != sd[k].shape:
                raise ValueError(f"{path}: {k} has shape {tuple(w.shape)}, expected {tuple(sd[k].shape)}")
            sd[k].copy_(w)
    return model


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """fastgpt state dict -> HF GPT2LMHeadModel keys and layouts (lm_head left out: it is tied)."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        v = v.detach().cpu()
        out[k] = (v.t() if k.endswith(_CONV1D) else v).contiguous().clone()
    return out


def to_hf_config(config: GPTConfig):
    from transformers import GPT2Config

    if not config.bias:
        raise ValueError("HF GPT-2 always has biases: a GPTConfig with bias=False cannot be exported")
    return GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        layer_norm_epsilon=1e-5, architectures=["GPT2LMHeadModel"], tie_word_embeddings=True,
    )


def save_pretrained(model, path: str) -> None:
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    to_hf_config(model.config).save_pretrained(str(out))
    tmp = out / "model.safetensors.tmp"
    save_file(to_hf_state_dict(model), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")


def to_hf(model):
    """A transformers GPT2LMHeadModel holding this model's weights."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(to_hf_config(model.config))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    bad = [k for k in missing if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if bad or unexpected:
        raise RuntimeError(f"export to transformers failed: missing {bad[:5]}, unexpected {unexpected[:5]}")
    hf.tie_weights()
    return hf.eval()
