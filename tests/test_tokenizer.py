"""Tokenizer: the released 7B-D files (vocab + merges, no tokenizer.json), HF tokenizer.json and
sentencepiece behind one interface; Molmo's special-token id rule."""
import json
import pickle

import pytest

from data_pipelines import tokenizer


@pytest.fixture(scope="module")
def qwen2(golden_dir):
  return tokenizer.load_tokenizer(golden_dir / "molmo-7b-d-hf")


def test_qwen2_special_ids(qwen2):
  assert qwen2.bos_id == qwen2.eos_id == 151643
  ids = qwen2.image_token_ids
  assert (ids.im_start, ids.im_end, ids.im_patch, ids.im_col) == (152064, 152065, 152066, 152067)
  assert qwen2.image_prompt_id == 152068
  assert qwen2.vocab_size == 152069


def test_qwen2_processor_prompts(qwen2, golden_dir):
  goldens = json.loads((golden_dir / "text" / "text_goldens.json").read_text())
  for case in goldens["hf_processor_prompts"]:
    assert qwen2.encode(case["prompt_string"]) == case["qwen2_token_ids"], case["text"]


def test_qwen2_matches_transformers(qwen2, golden_dir):
  """Cross-check against transformers' own loading of the same folder on tricky text."""
  import transformers  # the "torch" extra, which `make test` installs
  ref = transformers.Qwen2Tokenizer.from_pretrained(str(golden_dir / "molmo-7b-d-hf"))
  texts = [" User: What's in the image? Assistant:", "Ünïcödé 你好 мир\n\n\t  tabs  ",
           "x1=\"12.5\" y1=\"3.0\" <points>", "I'LL DON'T we've 12345 3.14159", " <im_patch><|image|>",
           "e\u0301 composed", "   leading spaces", "emoji 🐈‍⬛ and \r\n line"]
  for text in texts:
    assert qwen2.encode(text) == ref.encode(text, add_special_tokens=False), text
    ids = qwen2.encode(text)
    assert qwen2.decode(ids, skip_special_tokens=False) == ref.decode(ids), text


def test_pickles_for_worker_processes(qwen2):
  copy = pickle.loads(pickle.dumps(qwen2))
  assert copy.encode(" User: hi") == qwen2.encode(" User: hi")
  assert copy.image_token_ids == qwen2.image_token_ids and copy.bos_id == qwen2.bos_id


def test_decode_drops_special(qwen2):
  ids = [qwen2.bos_id, qwen2.image_token_ids.im_start] + qwen2.encode(" a cat") + [qwen2.eos_id]
  assert qwen2.decode(ids) == " a cat"


def test_hf_tokenizer_json_with_padding(tmp_path):
  """A tokenizer.json without image tokens: padded to pad_to, image tokens at pad_to + 0..4."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {"<unk>": 0, "<|endoftext|>": 1, "a": 2, "b": 3, "ab": 4}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  loaded = tokenizer.load_tokenizer(tmp_path, pad_to=16)
  assert loaded.bos_id == loaded.eos_id == 1
  ids = loaded.image_token_ids
  assert (ids.im_start, ids.im_end, ids.im_patch, ids.im_col, loaded.image_prompt_id) == (
      16, 17, 18, 19, 20)
  assert loaded.encode("ab a") == [4, 2]
  assert loaded.encode("<im_col>") == [19]
  assert loaded.vocab_size == 21


def test_sentencepiece(tmp_path):
  import sentencepiece  # a core dependency
  text = tmp_path / "corpus.txt"
  text.write_text("\n".join(["a red circle and a blue square", "point to the cat",
                             "how many dogs are there", "the clock shows ten past three"] * 50))
  sentencepiece.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=60, model_type="bpe",
      bos_id=-1, eos_id=1, unk_id=0, pad_id=-1, minloglevel=2)
  loaded = tokenizer.load_tokenizer(tmp_path / "sp.model", pad_to=64)
  assert loaded.bos_id == loaded.eos_id == 1
  assert loaded.image_token_ids.im_start == 64 and loaded.image_prompt_id == 68
  ids = loaded.encode("point to the red cat")
  assert loaded.decode(ids + [loaded.eos_id, 66]) == "point to the red cat"
  assert pickle.loads(pickle.dumps(loaded)).encode("point to the red cat") == ids  # grain workers


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    tokenizer.load_tokenizer(tmp_path)
