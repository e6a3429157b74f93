"""A sentencepiece model -> a Hugging Face `tokenizer.json` that encodes the same ids, with
Molmo's image tokens at the ids data_pipelines/tokenizer.py gives them.

    tok = sentencepiece_to_hf("spm.model", pad_to=vocab_size)   # a tokenizers.Tokenizer
    tok.save("out/tokenizer.json")

Only `tokenizers`, `sentencepiece` and protobuf are needed (no transformers). The model's own
normalizer spec is followed so that the result encodes like `SentencePieceProcessor.encode`:
its precompiled NFKC character map, extra-space removal, the dummy "▁" prefix and whitespace
escaping; BPE merges are ranked by piece score (sentencepiece merges the best-scoring pair
first), unigram models keep their scores, byte-fallback pieces `<0x..>` stay bytes. Ids past
the sentencepiece vocabulary are `|<EXTRA_TOKENS_i>|` padding up to `pad_to`, then the five
image tokens, as `load_tokenizer` lays them out for a sentencepiece model.
"""
import re

from data_pipelines.tokenizer import EXTRA_TOKEN, IMAGE_TOKENS

# sentencepiece piece types (sentencepiece_model.proto): NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4
UNIGRAM, BPE = 1, 2


def _read_proto(path: str):
  from sentencepiece import sentencepiece_model_pb2
  proto = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  return proto


def _bpe_merges(proto) -> list[tuple[str, str]]:
  """(left, right) pairs of normal pieces whose concatenation is a piece, best score first."""
  normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
  ranked = []
  for piece, (score, i) in normal.items():
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in normal and right in normal:
        ranked.append((-score, i, left, right))
  return [(left, right) for _, _, left, right in sorted(ranked)]


def sentencepiece_to_hf(path: str, *, pad_to: int | None = None):
  """tokenizers.Tokenizer equivalent to the sentencepiece model at `path` (see module doc).

  pad_to: the model's vocab_size (image tokens at pad_to + 0..4); default: the model's size.
  Raises ValueError for a model type other than BPE / unigram or pad_to below the model's size.
  """
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
  proto = _read_proto(path)
  spec, trainer = proto.normalizer_spec, proto.trainer_spec
  pieces = proto.pieces
  if trainer.model_type == BPE:
    tok = Tokenizer(models.BPE(vocab={p.piece: i for i, p in enumerate(pieces)}, merges=_bpe_merges(proto),
                               unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=trainer.byte_fallback,
                               dropout=None))
  elif trainer.model_type == UNIGRAM:
    tok = Tokenizer(models.Unigram([(p.piece, p.score) for p in pieces], unk_id=trainer.unk_id,
                                   byte_fallback=trainer.byte_fallback))
  else:
    raise ValueError(f"{path}: sentencepiece model type {trainer.model_type} (want BPE or unigram)")

  # Normalizer in sentencepiece's order: character map, extra spaces, escaping, dummy prefix.
  steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
  if spec.remove_extra_whitespaces:  # spaces only: newlines and tabs are left alone
    steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
  if spec.add_dummy_prefix:
    steps.append(normalizers.Prepend(" "))
  if spec.escape_whitespaces:
    steps.append(normalizers.Replace(" ", "▁"))
  tok.normalizer = normalizers.Sequence(steps)
  user_defined = [p.piece for p in pieces if p.type == USER_DEFINED]
  if user_defined:  # sentencepiece emits these whole and never merges across them
    pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
  steps = [decoders.Replace("▁", " ")]
  if trainer.byte_fallback:
    steps.append(decoders.ByteFallback())
  steps.append(decoders.Fuse())
  if spec.add_dummy_prefix:
    steps.append(decoders.Strip(content=" ", left=1))
  tok.decoder = decoders.Sequence(steps)
  tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                          for p in pieces if p.type == CONTROL])

  size = len(pieces)
  base = size if pad_to is None else pad_to
  if base < size:
    raise ValueError(f"{path}: pad_to={pad_to} is smaller than the sentencepiece vocabulary ({size})")
  # Added tokens take the next free ids in order: padding first, then the image tokens.
  tok.add_special_tokens([AddedToken(EXTRA_TOKEN.format(i), special=True, normalized=False)
                          for i in range(base - size)])
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
  return tok
