"""The GPT-2 BPE encoding, built offline.

`tiktoken.get_encoding("gpt2")` downloads `vocab.bpe` and `encoder.json` on first use. fastgpt
ships OpenAI's published copies of those two files in fastgpt/assets/ (package data), so we build
the identical `tiktoken.Encoding` from them with tiktoken's own converter, checked against the
sha256 hashes tiktoken expects: no network and no extra package.
"""
from __future__ import annotations

import functools
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT_TOKEN = 50256  # <|endoftext|>
N_VOCAB = 50257

# sha256 of OpenAI's published GPT-2 encoding files, as tiktoken_ext.openai_public checks them.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def _data_dir() -> Path:
    return Path(__file__).resolve().parent / "assets"


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding (50,257 ids, <|endoftext|> = 50256), identical to tiktoken's "gpt2"."""
    from tiktoken_ext.openai_public import r50k_pat_str

    data = _data_dir()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data / "vocab.bpe"),
        encoder_json_file=str(data / "encoder.json"),
        vocab_bpe_hash=_VOCAB_BPE_SHA256,
        encoder_json_hash=_ENCODER_JSON_SHA256,
    )
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=N_VOCAB,
    )
    return enc
