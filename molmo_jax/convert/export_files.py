"""The files of an exported folder besides weights and configs: the tokenizer and the official
remote code.

    tok = write_tokenizer("run/tokenizer/spm.model", "out/", vocab_size)   # + tokenizer.json for spm
    copy_remote_code("Molmo-7B-D-0924/", "out/")                            # --remote-code

Bad sources raise ExportError naming the flag and what is missing.
"""
from __future__ import annotations

import os
import shutil
from typing import List

from data_pipelines.spm_convert import sentencepiece_to_hf
from data_pipelines.tokenizer import Tokenizer, load_tokenizer
from molmo_jax.convert.export_formats import ExportError
from molmo_jax.convert.safetensors_stream import write_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json", "tokenizer.model", "spm.model", "chat_template.jinja")
# The modules an official Molmo folder's auto_map names (--remote-code).
REMOTE_CODE_MODULES = ("config_molmo.py", "modeling_molmo.py", "preprocessing_molmo.py",
                       "image_preprocessing_molmo.py")


def copy_tokenizer(source: str, folder: str) -> List[str]:
    """Copies the tokenizer files of `source` (a folder, or one tokenizer.json / sentencepiece
    .model file) into `folder`; returns the names copied."""
    if os.path.isfile(source):
        names = [source]
    elif os.path.isdir(source):
        names = [os.path.join(source, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
    else:
        raise ExportError(f"--tokenizer {source}: no such file or folder")
    if not names:
        raise ExportError(f"--tokenizer {source}: none of {list(TOKENIZER_FILES)} in it")
    for path in names:
        shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))
    return [os.path.basename(p) for p in names]


def write_tokenizer(source: str, folder: str, vocab_size: int) -> Tokenizer:
    """The tokenizer files of `source` in `folder`, plus, for a sentencepiece model, the
    tokenizer.json (and tokenizer_config.json) the official tokenizer and processor read, with
    the image tokens at the model's ids. Returns the project's view of the written folder."""
    names = copy_tokenizer(source, folder)
    spm = [n for n in names if n.endswith(".model")]
    if spm and "tokenizer.json" not in names:
        try:
            sentencepiece_to_hf(os.path.join(folder, spm[0]), pad_to=vocab_size).save(
                os.path.join(folder, "tokenizer.json"))
        except ValueError as e:
            raise ExportError(f"--tokenizer {source}: {e}") from e
        eos = load_tokenizer(os.path.join(folder, spm[0]), pad_to=vocab_size).eos_id
        eos_token = sentencepiece_to_hf(os.path.join(folder, spm[0])).id_to_token(eos)
        # BOS is EOS in Molmo (spec 4.1); the processor adds it itself, the tokenizer adds nothing.
        write_json(os.path.join(folder, "tokenizer_config.json"), {
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token, "pad_token": eos_token,
            "bos_token": None, "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000})
    try:
        return load_tokenizer(os.path.abspath(folder), pad_to=vocab_size)
    except (OSError, ValueError) as e:
        raise ExportError(f"--tokenizer {source}: {e}") from e


def copy_remote_code(source: str, folder: str) -> List[str]:
    """Copies the .py files of `source` (an official Molmo snapshot the user has) into `folder`,
    so that the folder's local auto_map resolves offline; returns the names copied."""
    if not os.path.isdir(source):
        raise ExportError(f"--remote-code {source}: not a folder")
    missing = [m for m in REMOTE_CODE_MODULES if not os.path.isfile(os.path.join(source, m))]
    if missing:
        raise ExportError(f"--remote-code {source}: missing {missing} (an official Molmo snapshot, e.g. "
                          f"Molmo-7B-D-0924, has {list(REMOTE_CODE_MODULES)})")
    names = sorted(n for n in os.listdir(source) if n.endswith(".py") and os.path.isfile(os.path.join(source, n)))
    for name in names:
        shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
    return names
