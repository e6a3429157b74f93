"""One tokenizer interface over Hugging Face tokenizers and sentencepiece models, with Molmo's
special tokens.

Sources `load_tokenizer` accepts (a file, or a checkpoint folder holding one of them):
  * `tokenizer.json` (any HF fast tokenizer, e.g. OLMo's);
  * `vocab.json` + `merges.txt` (+ `tokenizer_config.json` / `added_tokens.json`): byte-level BPE
    as saved by the slow Qwen2 / GPT-2 tokenizers (the released Molmo-7B-D / 72B folders); built
    here with the `tokenizers` library, no `transformers` needed;
  * a sentencepiece `*.model` (what the demo trains for itself).

Molmo's rules (spec 4.1): text is encoded without special tokens; BOS is the tokenizer's BOS or,
when it has none (Qwen2, OLMo), its EOS. The five image tokens `<im_start> <im_end> <im_patch>
<im_col> <|image|>` keep the ids the tokenizer already gives them (the 7B-D files list them);
otherwise the vocabulary is padded to `pad_to` (the model's `vocab_size`) and they take the ids
`pad_to + 0..4`.
"""
import functools
import json
import pathlib

from data_pipelines.multicrop import ImageTokenIds

IMAGE_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")
EXTRA_TOKEN = "|<EXTRA_TOKENS_{}>|"  # padding tokens between the base vocabulary and IMAGE_TOKENS
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")

# Pre-tokenizer split of Qwen2 (transformers' Qwen2 slow->fast conversion).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class Tokenizer:
  """Text <-> ids with Molmo's special tokens.

  Attributes: bos_id, eos_id, vocab_size (ids the tokenizer knows, image tokens included),
  image_token_ids (ImageTokenIds), image_prompt_id (`<|image|>`).
  """

  def __init__(self, backend, *, eos_id: int, bos_id: int | None, image_ids: dict[str, int],
               vocab_size: int):
    self._backend = backend
    self.eos_id = eos_id
    self.bos_id = eos_id if bos_id is None else bos_id
    self.vocab_size = vocab_size
    self.image_token_ids = ImageTokenIds(
        im_start=image_ids["<im_start>"], im_end=image_ids["<im_end>"],
        im_patch=image_ids["<im_patch>"], im_col=image_ids["<im_col>"])
    self.image_prompt_id = image_ids["<|image|>"]
    self._special = {self.eos_id, self.bos_id, *image_ids.values()}

  def encode(self, text: str) -> list[int]:
    """ids of `text`, no BOS/EOS added."""
    return self._backend.encode(text)

  def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
    """Text of `ids`; special tokens (BOS/EOS, image and padding tokens) dropped by default."""
    ids = [int(i) for i in ids]
    if skip_special_tokens:
      ids = [i for i in ids if i not in self._special and i < self._backend.size]
    return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    """Id of a token the tokenizer knows by name (e.g. an added special token), else None."""
    return self._backend.token_to_id(token)

  def __len__(self) -> int:
    return self.vocab_size


class _HFBackend:
  """A `tokenizers.Tokenizer`."""

  def __init__(self, tok):
    self.tok = tok
    self.size = tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text):
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids, skip_special_tokens):
    return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token):
    return self.tok.token_to_id(token)

  def add_special(self, tokens):
    from tokenizers import AddedToken
    self.tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    self.size = self.tok.get_vocab_size(with_added_tokens=True)


class _SentencePieceBackend:
  """A sentencepiece model. Ids beyond the model (padding / image tokens) decode to nothing."""

  def __init__(self, path):
    import sentencepiece
    self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    self.size = self.sp.get_piece_size()

  def encode(self, text):
    return self.sp.encode(text)

  def decode(self, ids, skip_special_tokens):
    return self.sp.decode([i for i in ids if i < self.size])

  def token_to_id(self, token):
    i = self.sp.piece_to_id(token)
    return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i


def _byte_level_bpe(folder: pathlib.Path):
  """tokenizers.Tokenizer from vocab.json + merges.txt (+ the added tokens of the folder)."""
  from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer
  from tokenizers import decoders, models, normalizers, pre_tokenizers
  vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
  merges = []
  for n, line in enumerate((folder / "merges.txt").read_text(encoding="utf-8").splitlines()):
    if not line or (n == 0 and line.startswith("#version")):
      continue
    parts = line.split(" ")
    if len(parts) != 2:
      raise ValueError(f"{folder / 'merges.txt'}:{n + 1}: expected two tokens, got {line!r}")
    merges.append(tuple(parts))
  config_path = folder / "tokenizer_config.json"
  config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
  tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                               continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
  if config.get("tokenizer_class", "Qwen2Tokenizer").startswith("Qwen2"):
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:  # GPT-2 style
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=config.get("add_prefix_space", False), use_regex=True)
  tok.decoder = decoders.ByteLevel()

  added = {int(i): t for i, t in config.get("added_tokens_decoder", {}).items()}
  if not added and (folder / "added_tokens.json").exists():
    added = {i: {"content": t, "special": True} for t, i in
             json.loads((folder / "added_tokens.json").read_text(encoding="utf-8")).items()}
  for token_id in sorted(added):
    spec = added[token_id]
    if token_id != tok.get_vocab_size(with_added_tokens=True):
      raise ValueError(f"{folder}: added token {spec['content']!r} has id {token_id}, but the "
                       f"next free id is {tok.get_vocab_size(with_added_tokens=True)}")
    token = AddedToken(spec["content"], single_word=spec.get("single_word", False),
                       lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                       normalized=spec.get("normalized", False), special=spec.get("special", True))
    (tok.add_special_tokens if spec.get("special", True) else tok.add_tokens)([token])
  return _HFBackend(tok), config.get("eos_token"), config.get("bos_token")


def _open_backend(path: pathlib.Path):
  """(backend, eos token name or None, bos token name or None) of a file or folder."""
  if path.is_dir():
    if (path / "tokenizer.json").exists():
      path = path / "tokenizer.json"
    elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
      return _byte_level_bpe(path)
    else:
      models = sorted(path.glob("*.model"))
      if not models:
        raise FileNotFoundError(f"{path}: no tokenizer.json, vocab.json + merges.txt or *.model")
      path = models[0]
  if path.suffix == ".model":
    return _SentencePieceBackend(path), None, None
  if path.suffix == ".json":
    from tokenizers import Tokenizer as HFTokenizer
    config_path = path.parent / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    return _HFBackend(HFTokenizer.from_file(str(path))), config.get("eos_token"), config.get(
        "bos_token")
  raise ValueError(f"{path}: unknown tokenizer file type (want tokenizer.json or *.model)")


def _token_name(value):
  return value.get("content") if isinstance(value, dict) else value


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str | pathlib.Path, *, pad_to: int | None = None) -> Tokenizer:
  """Loads a tokenizer (file or checkpoint folder, see module doc) with Molmo's special tokens.

  Args:
    path: tokenizer file or folder.
    pad_to: the model's `vocab_size`; image tokens missing from the tokenizer get ids
      pad_to + 0..4 (default: the tokenizer's own size).
  """
  path = pathlib.Path(path)
  backend, eos_name, bos_name = _open_backend(path)
  eos_name, bos_name = _token_name(eos_name), _token_name(bos_name)
  if isinstance(backend, _SentencePieceBackend):
    eos_id = backend.sp.eos_id()
    bos_id = backend.sp.bos_id() if backend.sp.bos_id() >= 0 else None
    if eos_id < 0:
      raise ValueError(f"{path}: sentencepiece model has no EOS piece")
  else:
    names = [eos_name] if eos_name else [t for t in EOS_CANDIDATES if backend.token_to_id(t) is
                                          not None][:1]
    if not names or backend.token_to_id(names[0]) is None:
      raise ValueError(f"{path}: cannot find the EOS token (tried {eos_name or EOS_CANDIDATES})")
    eos_id = backend.token_to_id(names[0])
    bos_id = backend.token_to_id(bos_name) if bos_name else None

  image_ids = {t: backend.token_to_id(t) for t in IMAGE_TOKENS}
  if any(i is None for i in image_ids.values()):
    base = backend.size if pad_to is None else pad_to
    if base < backend.size:
      raise ValueError(f"{path}: pad_to={pad_to} is smaller than the tokenizer ({backend.size})")
    if isinstance(backend, _HFBackend):
      backend.add_special([EXTRA_TOKEN.format(i) for i in range(base - backend.size)])
      backend.add_special(list(IMAGE_TOKENS))
      image_ids = {t: backend.token_to_id(t) for t in IMAGE_TOKENS}
    else:
      image_ids = {t: base + k for k, t in enumerate(IMAGE_TOKENS)}
  vocab_size = max(backend.size, max(image_ids.values()) + 1)
  return Tokenizer(backend, eos_id=eos_id, bos_id=bos_id, image_ids=image_ids,
                   vocab_size=vocab_size)
