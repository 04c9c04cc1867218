"""Byte-level BPE tokenizer: training, saving, loading, and export for Hugging Face.

Byte-level BPE encodes any text losslessly (no unknown tokens), which is what a code-and-prose
corpus needs. ``<|endoftext|>`` is the only special token, trained first so its id is 0 in every
tokenizer we train; it terminates every document and doubles as BOS for exported models.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from pretrain.data.manifest import MANIFEST_NAME, DatasetError, is_url, join_location, read_location, read_manifest

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (256 bytes + merges + EOS) on ``texts``."""
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + EOS + one merge), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def eos_id(tokenizer: Tokenizer) -> int:
    """The id of ``<|endoftext|>``; a clear error if the tokenizer lacks it."""
    tid = tokenizer.token_to_id(EOS_TOKEN)
    if tid is None:
        raise DatasetError(
            f"tokenizer has no {EOS_TOKEN} token; train one with tools/train_tokenizer.py"
        )
    return tid


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path) -> Path:
    """Write ``tokenizer.json`` into ``out_dir`` atomically; refuse to replace an existing one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TOKENIZER_FILE
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose another --out directory or delete it")
    tmp = out / f".{TOKENIZER_FILE}.tmp-{os.getpid()}"
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a dataset directory, a directory with tokenizer.json, or the file itself."""
    if is_url(path):
        return _load_remote(str(path))
    p = Path(path)
    if p.is_dir():
        if (p / MANIFEST_NAME).is_file():
            info = read_manifest(p).tokenizer
            if info is None:
                raise DatasetError(f"{p / MANIFEST_NAME}: dataset records no tokenizer; pass the tokenizer explicitly")
            p = p / info.file
        else:
            p = p / TOKENIZER_FILE
    if not p.is_file():
        raise DatasetError(f"{p}: tokenizer file not found; train one with tools/train_tokenizer.py")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises plain Exception on a bad file
        raise DatasetError(f"{p}: not a valid tokenizers JSON file ({e}); re-create it with tools/train_tokenizer.py") from None


def _load_remote(location: str) -> Tokenizer:
    """The tokenizer of a dataset at a URL (manifest.json and tokenizer.json fetched through webdataset)."""
    info = read_manifest(location).tokenizer
    if info is None:
        raise DatasetError(f"{location}: dataset records no tokenizer; pass the tokenizer explicitly")
    url = join_location(location, info.file)
    try:
        return Tokenizer.from_str(read_location(url).decode())
    except Exception as e:  # an OSError from the transport or tokenizers' plain Exception
        raise DatasetError(f"{url}: tokenizer cannot be read ({e}); check the dataset location") from None


def save_hf_tokenizer(dataset_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the dataset's tokenizer so ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads it.

    EOS doubles as BOS (GPT-2 convention); no pad token is set, callers that batch pick one.
    """
    from transformers import PreTrainedTokenizerFast  # heavy import, only for export

    tok = load_tokenizer(dataset_dir)
    eos = tok.id_to_token(eos_id(tok))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, unk_token=None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # save_pretrained names the class; make it explicit for older transformers readers too.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def train_tokenizer_from_files(inputs: list[str | Path], vocab_size: int, out_dir: str | Path) -> Path:
    """The library side of tools/train_tokenizer.py: text/JSONL files or directories → tokenizer.json."""
    from pretrain.data.text import iter_documents

    path = Path(out_dir) / TOKENIZER_FILE
    if path.exists():  # fail before spending time on training
        raise FileExistsError(f"{path} already exists; choose another --out directory or delete it")
    tok = train_tokenizer((text for _, text in iter_documents(inputs)), vocab_size)
    return save_tokenizer(tok, out_dir)
