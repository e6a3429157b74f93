"""Writing an exported folder: atomically, and the files besides weights and configs (the
tokenizer and the official remote code).

    with AtomicFolder("out/", force=False) as tmp: ...                     # out/ appears when complete
    tok = write_tokenizer("run/tokenizer/spm.model", tmp, vocab_size)      # + tokenizer.json for spm
    copy_remote_code("Molmo-7B-D-0924/", tmp)                               # --remote-code

Bad sources raise ExportError naming the flag and what is missing.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import List

from data_pipelines.spm_convert import sentencepiece_to_hf
from data_pipelines.tokenizer import Tokenizer, load_tokenizer
from molmo_jax.convert.export_formats import ExportError
from molmo_jax.convert.safetensors_stream import write_json

log = logging.getLogger(__name__)

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


def _stale_temporaries(out: str) -> List[str]:
    """Temporary folders of `out` whose process is gone (killed before it could clean up)."""
    parent, name = os.path.split(out)
    stale = []
    for entry in os.listdir(parent):
        for prefix in (f".{name}.partial-", f".{name}.replaced-"):
            pid = entry[len(prefix):] if entry.startswith(prefix) else ""
            if pid.isdigit() and not _pid_alive(int(pid)):
                stale.append(os.path.join(parent, entry))
    return stale


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicFolder:
    """`with AtomicFolder(out, force) as tmp:` writes into `.NAME.partial-PID` beside `out` and
    renames it to `out` on success; on any error (or SIGTERM turned into SystemExit) the
    temporary folder is removed, and a failed write (OSError: disk full, read-only target)
    becomes one ExportError naming the file. Leftovers of killed runs are removed at the next
    start."""

    def __init__(self, out: str, force: bool):
        self.out = os.path.abspath(out.rstrip("/") or out)
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ExportError(f"--out {out}: exists and is not a folder")
        if os.path.isdir(self.out) and os.listdir(self.out) and not force:
            raise ExportError(f"--out {out}: folder exists and is not empty; pass --force to replace it")
        parent = os.path.dirname(self.out)
        if not os.path.isdir(parent):
            raise ExportError(f"--out {out}: parent folder {parent} does not exist")
        self.tmp = os.path.join(parent, f".{os.path.basename(self.out)}.partial-{os.getpid()}")

    def __enter__(self) -> str:
        for stale in _stale_temporaries(self.out):
            log.warning("removing %s, left by an interrupted export", stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.makedirs(self.tmp)
        except OSError as e:  # e.g. a read-only target
            raise self.write_error(e) from e
        return self.tmp

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if issubclass(kind, OSError):  # disk full, read-only, quota: one line, not a traceback
                raise self.write_error(value) from value
            return
        old = None
        try:
            if os.path.isdir(self.out):  # --force: the old folder goes only once the new one is in place
                old = self.tmp.replace(".partial-", ".replaced-")
                os.rename(self.out, old)
            os.rename(self.tmp, self.out)
        except OSError as e:
            if old is not None and not os.path.exists(self.out):
                os.rename(old, self.out)  # the previous folder back in its place
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise self.write_error(e) from e
        if old is not None:
            shutil.rmtree(old)

    def write_error(self, e: OSError) -> ExportError:
        """The one-line error of a failed write, naming the file as it would have been called."""
        where = str(e.filename2 or e.filename or self.out).replace(self.tmp, self.out)
        return ExportError(f"--out {self.out}: cannot write {where} ({e.strerror or e}); nothing was written")
