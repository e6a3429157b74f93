"""Chat formatting, style prefixes, templates and point text against the official formatter's
outputs (text goldens), tokenized with the real Molmo-7B-D tokenizer."""
import json

import numpy as np
import pytest

from data_pipelines import formatting, multicrop, preprocess, prompt_templates, tokenizer

FORMATTERS = {"finetuned": formatting.FINETUNED, "captioner": formatting.CAPTIONER,
              "finetuned_debug": formatting.FormatConfig(debug=True)}


class FixedRng:
  """The goldens' deterministic stand-in: constant random() / normal(), randint -> lo + k."""

  def __init__(self, spec):
    self._random, self._normal = spec["random()"], spec["normal()"]
    self._k = int(spec["randint(lo,hi)"].split("+")[1].split(",")[0])

  def random(self):
    return self._random

  def normal(self, scale=1.0):
    return self._normal

  def randint(self, lo, hi):
    return min(lo + self._k, hi - 1)


def _rng(spec):
  if spec["type"] == "numpy.random.RandomState":
    return np.random.RandomState(spec["seed"])
  return FixedRng(spec)


@pytest.fixture(scope="module")
def goldens(golden_dir):
  return json.loads((golden_dir / "text" / "text_goldens.json").read_text())


@pytest.fixture(scope="module")
def qwen2(golden_dir):
  return tokenizer.load_tokenizer(golden_dir / "molmo-7b-d-hf")


def _run(case, tok):
  cfg = FORMATTERS[case["formatter"]]
  conversations, metadata = formatting.format_example(
      case["example"], cfg, for_inference=case["for_inference"], rng=_rng(case["rng"]),
      image_hw=case["image_hw"])
  layout = multicrop.image_layout(*case["image_hw"], multicrop.CropConfig(), tok.image_token_ids)
  tokens = preprocess.tokenize_conversations(conversations, tok, image_tokens=layout.tokens,
                                             for_inference=case["for_inference"])
  return conversations, metadata, tokens, len(layout.tokens)


def _after_image(tokens, n):
  """Our sequence cut the way the goldens record it."""
  out = {"input_tokens_after_image": tokens["input_tokens"][1 + n:].tolist(),
         "target_tokens_after_image": tokens["target_tokens"][n:].tolist(),
         "loss_masks_after_image": tokens["loss_masks"][n:].tolist(),
         "position_ids_after_image": tokens["position_ids"][1 + n:].tolist()}
  if "subsegment_ids" in tokens:
    out["subsegment_ids_after_image"] = tokens["subsegment_ids"][1 + n:].tolist()
  return out


def test_points_to_text(goldens):
  for case in goldens["points_to_text"]:
    out = formatting.points_to_text(case["points_xy"], case["scale"], case["label_text"],
                                    case["alt_text"])
    assert out == case["output"], case["id"]


def test_format_points(goldens):
  for case in goldens["format_points"]:
    assert formatting.format_points(case["example"], case["image_hw"]) == case["output"], case["id"]


def test_formatter_cases_exact(goldens, qwen2):
  """Cases without an official template sentence: strings, metadata and every token array."""
  cases = [c for c in goldens["formatter_cases"] if not c["uses_prompt_template"] and "error" not in c]
  assert len(cases) >= 18
  for case in cases:
    conversations, metadata, tokens, n = _run(case, qwen2)
    messages = conversations if "message_list" in case["example"] else conversations[0]
    assert messages == case["messages"], case["id"]
    joined = ["".join(c) for c in conversations]
    assert (joined if "message_list" in case["example"] else joined[0]) == case["joined"]
    assert metadata == case["metadata"], case["id"]
    gold = case["tokenized"]
    assert n == gold["n_image_tokens"] and tokens["input_tokens"][0] == gold["bos"], case["id"]
    ours = _after_image(tokens, n)
    for key, value in gold.items():
      if key.endswith("_after_image"):
        assert ours[key] == value, (case["id"], key)
    if "subsegment_id_of_image_and_bos" in gold:
      assert set(tokens["subsegment_ids"][:1 + n].tolist()) == {gold["subsegment_id_of_image_and_bos"]}


def _template_index(case, n_templates):
  if case["formatter"] == "finetuned_debug":
    return 0
  return _rng(case["rng"]).randint(0, n_templates)


def test_formatter_cases_with_templates(goldens, qwen2):
  """Cases whose prompt is an official template: everything but the template sentence matches
  (style prefix, role markers, spacing, answer, metadata, token structure), and our template is
  the one the same random draw selects."""
  cases = [c for c in goldens["formatter_cases"] if c["uses_prompt_template"]]
  assert len(cases) == 7
  for case in cases:
    conversations, metadata, tokens, n = _run(case, qwen2)
    ours, gold = conversations[0], case["messages"]
    style = case["example"]["style"]
    templates = prompt_templates.TEMPLATES[style]
    label = case["example"].get("label", "").lower()
    template = templates[_template_index(case, len(templates))].format(label=label)
    prefix = f"{style}: " if gold[0].startswith(f" User: {style}:") else ""
    assert ours[0] == f" User: {prefix}{template} Assistant:", case["id"]
    assert gold[0].startswith(" User: " + prefix) and gold[0].endswith(" Assistant:")
    assert ours[1:] == gold[1:] and metadata == case["metadata"], case["id"]

    gold_tok = case["tokenized"]
    assert n == gold_tok["n_image_tokens"]
    n_user, n_gold_user = len(qwen2.encode(ours[0])), len(qwen2.encode(gold[0]))
    after = _after_image(tokens, n)
    # The answer (and EOS) tokens and their loss mask are identical; positions run on.
    assert after["target_tokens_after_image"][n_user:] == \
        gold_tok["target_tokens_after_image"][n_gold_user:], case["id"]
    assert after["loss_masks_after_image"][n_user:] == gold_tok["loss_masks_after_image"][n_gold_user:]
    assert after["loss_masks_after_image"][:n_user] == [0.0] * n_user
    assert after["position_ids_after_image"] == list(range(1 + n, 1 + n + len(after[
        "position_ids_after_image"])))
    assert (len(after["target_tokens_after_image"]) - n_user ==
            len(gold_tok["target_tokens_after_image"]) - n_gold_user)


def test_messages_list_keeps_style():
  """The official formatter crashes on a `messages` example under demo_or_style (it loses the
  style); we use the example's style."""
  example = {"style": "user_qa", "messages": ["What is this?", "A cat.", "What color is it?"]}
  rng = FixedRng({"random()": 0.9, "normal()": 0.0, "randint(lo,hi)": "min(lo+0, hi-1)"})
  conversations, _ = formatting.format_example(example, for_inference=True, rng=rng)
  assert conversations == [[" User: What is this? Assistant:", " A cat.",
                            " User: What color is it? Assistant:"]]
  rng = FixedRng({"random()": 0.05, "normal()": 0.0, "randint(lo,hi)": "min(lo+0, hi-1)"})
  conversations, _ = formatting.format_example(example, for_inference=True, rng=rng)
  assert conversations[0][0] == " User: user_qa: What is this? Assistant:"


def test_deterministic_inference_without_rng():
  conversations, _ = formatting.format_example({"style": "pointing", "label": "Cats"},
                                               for_inference=True)
  assert conversations == [[f" User: {prompt_templates.POINTING[0].format(label='cats')} Assistant:"]]


def test_caption_length_hint_without_rng():
  caption = "x" * 150
  conversations, _ = formatting.format_example({"style": "long_caption", "caption": caption},
                                               formatting.CAPTIONER)
  assert conversations == [[" long_caption 10:", " " + caption]]


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="no answer"):
    formatting.format_example({"style": "vqa2", "question": "Why?"})
  with pytest.raises(ValueError, match="zero points"):
    formatting.format_points({"style": "other", "label": "x", "points": []}, (10, 10))
  with pytest.raises(ValueError, match="needs a 'label' or a 'question'"):
    formatting.format_example({"style": "pointing", "points": []})
  with pytest.raises(ValueError, match="image_hw"):
    formatting.format_points({"style": "pointing", "label": "x", "points": [[1, 2]]})


def test_parse_all_point_forms():
  parse = formatting.parse_points
  np.testing.assert_allclose(parse('<point x="12.5" y="40.0" alt="a">a</point>'), [[12.5, 40.0]])
  np.testing.assert_allclose(
      parse('Counting the <points x1="1.0" y1="2.0" x2="30.5" y2="99.9" alt="b">b</points> shows '
            'a total of 2.'), [[1.0, 2.0], [30.5, 99.9]])
  np.testing.assert_allclose(parse('<points alt="c" coords="1 1 125 400 2 500 999">c</points>'),
                             [[12.5, 40.0], [50.0, 99.9]])
  np.testing.assert_allclose(parse("(10.5, 20)\n(30, 40.25)"), [[10.5, 20.0], [30.0, 40.25]])
  np.testing.assert_allclose(parse("Click(55.2, 7.1)"), [[55.2, 7.1]])
  # Out of range points are dropped; text without points gives an empty [0, 2] array.
  np.testing.assert_allclose(parse('<points x1="101.0" y1="2.0" x2="3.0" y2="4.0">d</points>'),
                             [[3.0, 4.0]])
  assert parse("There are none.").shape == (0, 2)
  assert parse("(120, 5)").shape == (0, 2)


def test_point_text_round_trip():
  rng = np.random.default_rng(0)
  for _ in range(200):
    n = int(rng.integers(1, 12))
    w, h = int(rng.integers(1, 4000)), int(rng.integers(1, 4000))
    points = rng.uniform(0, 1, size=(n, 2)) * [w, h]
    text = formatting.points_to_text(points, [w / 100, h / 100], "obj", "obj")
    parsed = formatting.parse_points(text)
    expected = sorted((round(x, 1), round(y, 1)) for x, y in points / [w / 100, h / 100])
    expected.sort(key=lambda p: p[0] * 10000 + p[1])
    np.testing.assert_allclose(parsed, np.array(expected).reshape(-1, 2), atol=1e-9)
    assert len(parsed) == n
