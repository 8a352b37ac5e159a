"""The real CLIP BPE tokenizer, built offline from the vocabulary that open-clip-torch ships.

SDXL's two tokenizers are both this tokenizer (the second pads with "!"), so prompts and the
trigger words tokenize exactly as they do for SDXL. The files are written once into a folder
(`vocab.json`, `merges.txt`) and loaded with transformers' `CLIPTokenizer.from_pretrained`.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer

NUM_MERGES = 49152 - 256 - 2  # as in OpenAI's and open_clip's SimpleTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table, which CLIP's BPE vocabulary uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def open_clip_bpe_path() -> Path:
    try:
        import open_clip
    except ImportError as err:
        raise ImportError("the CLIP vocabulary comes from open-clip-torch: pip install open-clip-torch") from err
    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_tokenizer_files(folder: str | Path, bpe_path: str | Path | None = None) -> Path:
    """Write vocab.json and merges.txt (49,408 tokens) for transformers' CLIPTokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_path or open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [token + "</w>" for token in vocab]
    vocab += ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def clip_tokenizer(folder: str | Path, *, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The CLIP tokenizer from `folder` (written first if missing); pad "!" for SDXL's second one."""
    folder = Path(folder)
    if not (folder / "vocab.json").is_file():
        write_clip_tokenizer_files(folder)
    # transformers 5 silently mis-tokenizes when the two files are passed as keywords: pass positionally.
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77)
