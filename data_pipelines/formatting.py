"""Example dicts -> chat messages, and the text form of points (spec 4.2-4.5).

`format_example` turns one example in the official Molmo example shape (see the
`formatter_cases` of the text goldens) into conversations: lists of strings alternating user /
assistant, every one starting with a space, user turns wrapped as "User: ... Assistant:" for the
fine-tuned models. It adds the style prefix ("vqa2: ...", or for captioning "long_caption 9:"),
draws prompt templates (our own wording, `prompt_templates.py`), builds multiple-choice prompts
and writes points as `<point>` / `<points>` text (Molmo2's html-v2 `<points coords=..>` text with
point_format "html-v2": `molmo2_points`). Random choices follow the official draw order,
so a numpy RandomState with the same seed makes the same choices:
  1. template index `randint(0, n)` (long captions, pointing / counting without a question;
     not in debug mode);
  2. `randint(0, n)` among the most frequent answers when `answers` is a list;
  3. the prefix: `random()` for demo styles under "demo_or_style" (also in debug mode), or
     `random()` and, if > 0.1, `normal(scale=25)` for "style_and_length" in training.
With `rng=None` choices are deterministic: first template, no prefix for demo styles, first
most frequent answer, exact caption-length hint.

`parse_points` reads points back from model output in every format Molmo models write.
"""
import collections
import dataclasses
import re

import numpy as np

from data_pipelines import molmo2_points
from data_pipelines.prompt_templates import TEMPLATES

# Styles the fine-tuned models answer without a prefix 90 % of the time (user-facing tasks).
DEMO_STYLES = ("point_count", "pointing", "user_qa", "long_caption")
NO_PREFIX_STYLES = ("android_control", "demo")
STYLE_ALIASES = {"eval_short_answer": "vqa2", "eval_multiple_choice": "a_okvqa_mc"}
OPTION_LETTERS = "ABCDEFG"
METADATA_KEYS = ("answer_idx", "answers", "answer", "points", "options")


@dataclasses.dataclass(frozen=True)
class FormatConfig:
  """How examples become text.

  prompt_templates: "uber_model" (fine-tuning: templates for captions / pointing) or "none".
  message_format: "role" ("User: ... Assistant:"), "qwen3" (Molmo2's "<|im_start|>user\n..."
    turns) or "none" (captioning).
  system_prompt: "demo_or_style", "demo_or_style_v2" (Molmo2: no prefix for the styles of
    `plain_styles`, "style:" for every other), "style_and_length", "style" or None.
  always_start_with_space: a space before every message (the released models).
  default_inference_len: length hint at inference with "style_and_length".
  select_answer: "best" (a most frequent answer) or "first" (smallest string).
  debug: first template always, style prefix always.
  plain_styles: the styles "demo_or_style_v2" leaves without a prefix.
  point_format: "molmo" (`<point x=".." y="..">` text, `format_points`) or "html-v2" (Molmo2 SFT:
    pointing / counting messages of images and videos get their prompt and answer from
    `molmo2_points.image_point_text` / `video_point_text`, the official uber_model_v2 templates
    and html-v2 point text, whatever prompt_templates says).
  """
  prompt_templates: str = "uber_model"
  message_format: str = "role"
  system_prompt: str | None = "demo_or_style"
  always_start_with_space: bool = True
  default_inference_len: int | None = 65
  select_answer: str = "best"
  debug: bool = False
  plain_styles: tuple[str, ...] = ()
  point_format: str = "molmo"


FINETUNED = FormatConfig()
CAPTIONER = FormatConfig(prompt_templates="none", message_format="none",
                         system_prompt="style_and_length")


# ---------------------------------------------------------------------------------------------
# Points as text.

def points_to_text(points, scale, label: str, alt: str) -> str:
  """`<point x=".." y=".." alt="..">label</point>` (one point) or
  `<points x1=".." y1=".." x2=.. ... alt="..">label</points>`.

  points: [N, 2] (x, y); scale: (sx, sy) dividing pixel coordinates into percent (w/100, h/100),
  or a number s for points given on a 0..s scale. Values are rounded to one decimal with numpy's
  round (half to even on the binary value) and sorted by x, then y, after rounding.
  """
  points = np.array(points, dtype=np.float64).reshape(-1, 2)
  if isinstance(scale, (tuple, list, np.ndarray)):
    points = points / np.asarray(scale, np.float64)[None, :]
  else:
    points = points * (100 / scale)
  rounded = sorted(([round(x, 1), round(y, 1)] for x, y in points),
                   key=lambda p: p[0] * 10000 + p[1])
  if len(rounded) == 1:
    (x, y), = rounded
    return f'<point x="{x:0.1f}" y="{y:0.1f}" alt="{alt}">{label}</point>'
  coords = " ".join(f'x{i}="{x:0.1f}" y{i}="{y:0.1f}"' for i, (x, y) in enumerate(rounded, 1))
  return f'<points {coords} alt="{alt}">{label}</points>'


def format_points(example: dict, image_hw: tuple[int, int] | None = None) -> str:
  """The answer of a pointing / counting example.

  example: "style" ("pointing" or "point_count"), "points" [N, 2] (x, y) in pixels of an
  image_hw = (h, w) image, or on a 0..point_scale scale with "point_scale", and "label"
  (lower-cased) or else "question" (as is) for the label text.
  """
  points = example["points"]
  style = example["style"]
  label = example["label"].lower() if "label" in example else example["question"]
  if len(points) == 0:
    if style in ("pointing", "point_count"):
      return "There are none."
    raise ValueError(f"format_points: style {style!r} has no text for zero points")
  if "point_scale" in example:
    text = points_to_text(points, example["point_scale"], label, label)
  else:
    if image_hw is None:
      raise ValueError("format_points: pixel points need the image size (image_hw)")
    h, w = image_hw
    text = points_to_text(points, [w / 100, h / 100], label, label)
  if style == "point_count":
    return f"Counting the {text} shows a total of {len(points)}."
  return text


def format_annotated_text(answer: str, annotations) -> str:
  """Replaces each `<|POINT|>` of the answer by the next annotation's points (0..100 scale)."""
  for note in annotations:
    before, sep, after = answer.partition("<|POINT|>")
    if not sep:
      raise ValueError(f"answer has fewer <|POINT|> placeholders than annotations: {answer!r}")
    answer = before + points_to_text(note["points"], 100, note["inline_text"],
                                     note["alt_text"]) + after
  return answer


_NUM = r"([+-]?\d+(?:\.\d+)?)"
_XY_ATTR = re.compile(rf'\bx(\d*)\s*=\s*"{_NUM}"\s+y\1\s*=\s*"{_NUM}"')
_POINT_TAG = re.compile(r"<points?\b[^>]*>", re.IGNORECASE)
_COORDS_ATTR = re.compile(r'coords\s*=\s*"([0-9\t:;, .]+)"')
_MOLMO2_FRAME = re.compile(r"(?:^|[\t:,;])\s*[0-9.]+ ((?:\d+ \d{3,4} \d{3,4} ?)+)")
_MOLMO2_POINT = re.compile(r"(\d+) (\d{3,4}) (\d{3,4})")
_TUPLE = re.compile(rf"(?<![\w.])(?:click)?\(\s*{_NUM}\s*,\s*{_NUM}\s*\)", re.IGNORECASE)


def parse_points(text: str) -> np.ndarray:
  """float64[N, 2] (x, y) in percent of the image width / height, in order of appearance.

  Reads, in this order of preference (the first format found wins, so nothing is counted
  twice): Molmo `<point x="" y="">` / `<points x1="" y1="" ...>` tags; Molmo2
  `<points coords="1 1 453 678 2 ...">` (frame, then index x y on a 0..1000 scale); `(x, y)`
  and `Click(x, y)` on a 0..100 scale. Points outside 0..100 are dropped.
  """
  found = []
  for tag in _POINT_TAG.findall(text):
    coords = _COORDS_ATTR.search(tag)
    if coords:
      for frame in _MOLMO2_FRAME.finditer(coords.group(1)):
        found += [(int(x) / 10, int(y) / 10) for _, x, y in _MOLMO2_POINT.findall(frame.group(1))]
    else:
      found += [(float(x), float(y)) for _, x, y in _XY_ATTR.findall(tag)]
  if not found:
    found = [(float(x), float(y)) for x, y in _TUPLE.findall(text)]
  points = np.array(found, np.float64).reshape(-1, 2)
  return points[np.all((points >= 0) & (points <= 100), axis=1)]


# ---------------------------------------------------------------------------------------------
# Prompts and messages.

def format_options(example: dict) -> tuple[str | None, str, dict]:
  """Multiple choice: (answer, prompt, metadata). Lettered "A: opt" lines for "options", plain
  lines for "unlabelled_options" (whose answer is the option text)."""
  if "options" in example:
    options = example["options"]
    if len(options) > len(OPTION_LETTERS):
      raise ValueError(f"at most {len(OPTION_LETTERS)} options, got {len(options)}")
    names = OPTION_LETTERS[:len(options)]
    lines = [f"{letter}: {opt}" for letter, opt in zip(names, options)]
  else:
    options = example["unlabelled_options"]
    names, lines = options, list(options)
  answer = names[example["answer_idx"]] if "answer_idx" in example else None
  return answer, example["question"] + "\n" + "\n".join(lines) + "\n", {"option_names": names}


def select_answer(answers, rng, how: str = "best"):
  """One answer of a list of annotator answers ("best": a most frequent one, drawn with rng)."""
  if answers is None or isinstance(answers, str):
    return answers
  if how == "first":
    return min(answers)
  if how != "best":
    raise ValueError(f"select_answer must be 'best' or 'first', got {how!r}")
  counts = collections.Counter(answers)
  top = max(counts.values())
  candidates = [a for a, c in counts.items() if c == top]
  return candidates[rng.randint(0, len(candidates)) if rng is not None else 0]


def _template(style: str, label: str | None, cfg: FormatConfig, rng) -> str:
  templates = TEMPLATES[style]
  index = 0 if cfg.debug or rng is None else rng.randint(0, len(templates))
  return templates[index].format(label=label) if label is not None else templates[index]


def user_prompt(example: dict, cfg: FormatConfig, *, for_inference: bool, rng,
                image_hw=None) -> tuple[str, str | None, dict]:
  """(user prompt, answer or None, extra metadata) of a single-turn example dict."""
  if cfg.prompt_templates not in ("uber_model", "none"):
    raise ValueError(f"prompt_templates must be 'uber_model' or 'none', got {cfg.prompt_templates!r}")
  style = example.get("style")
  answer, metadata = None, {}
  if cfg.point_format not in ("molmo", "html-v2"):
    raise ValueError(f"point_format must be 'molmo' or 'html-v2', got {cfg.point_format!r}")
  html_v2 = cfg.point_format == "html-v2"
  if "prompt" in example:  # a complete prompt given (eval sets)
    prompt = example["prompt"]
  elif html_v2 and style in molmo2_points.IMAGE_POINT_STYLES:
    prompt, answer = molmo2_points.image_point_text(example, image_hw, rng, cfg.debug)
  elif html_v2 and style in molmo2_points.VIDEO_POINT_STYLES:
    prompt, answer = molmo2_points.video_point_text(example, rng, cfg.debug)
  elif style in ("pointing", "point_count"):
    if "question" in example:
      prompt = example["question"]
    elif "label" in example or "label_cased" in example:
      label = example["label"].lower() if "label" in example else example["label_cased"]
      prompt = label if cfg.prompt_templates == "none" else _template(style, label, cfg, rng)
    else:
      raise ValueError(f"{style} example needs a 'label' or a 'question'; keys: {sorted(example)}")
    if "points" in example:
      answer = format_points(example, image_hw)
  elif style == "long_caption" and cfg.prompt_templates == "uber_model":
    prompt = _template(style, None, cfg, rng)
  elif "question" in example and ("options" in example or "unlabelled_options" in example):
    answer, prompt, metadata = format_options(example)
  else:
    prompt = example.get("question", "")

  if answer is None and not for_inference:
    if "answers" in example:
      answer = select_answer(example["answers"], rng, cfg.select_answer)
    elif "answer" in example:
      answer = example["answer"]
      if "answer_annotations" in example:
        answer = format_annotated_text(answer, example["answer_annotations"])
    elif "answer_with_points" in example:
      answer = example["answer_with_points"]
    elif "text" in example:
      answer = example["text"]
    elif "caption" in example:
      answer = example["caption"]
    else:
      raise ValueError(f"example of style {style!r} has no answer (answer / answers / text / "
                       f"caption / points); keys: {sorted(example)}. Use for_inference=True to "
                       f"format only the prompt.")
  return prompt, answer, metadata


def style_prefix(style: str | None, cfg: FormatConfig, *, for_inference: bool, answer: str,
                 rng) -> str:
  """The style / length prefix of the first user message ("" for none)."""
  style = STYLE_ALIASES.get(style, style)
  if cfg.system_prompt == "style":
    return f"{style}:"
  if cfg.system_prompt == "demo_or_style":
    if style in NO_PREFIX_STYLES:
      return ""
    if style in DEMO_STYLES:
      # Drawn even in debug mode, to keep the random stream aligned with training.
      draw = rng.random() if rng is not None else 1.0
      return f"{style}:" if (draw <= 0.1 or cfg.debug) else ""
    if style is None:
      raise ValueError("demo_or_style needs the example's 'style'")
    return f"{style}:"
  if cfg.system_prompt == "demo_or_style_v2":
    if style is None:
      raise ValueError("demo_or_style_v2 needs the example's 'style'")
    return "" if style in cfg.plain_styles else f"{style}:"
  if cfg.system_prompt == "style_and_length":
    if for_inference:
      n = cfg.default_inference_len
      return f"{style} {n}:" if n is not None and str(n) else f"{style} :"
    if rng is None or rng.random() > 0.1:
      noise = 0 if rng is None else int(rng.normal(scale=25))  # int() truncates toward zero
      n = len(answer) + noise
      return f"{style} {n // 15}:"
    return f"{style} :"
  raise ValueError(f"unknown system_prompt {cfg.system_prompt!r}")


def _chat_messages(messages: list[str], cfg: FormatConfig) -> list[str]:
  out = []
  for i, message in enumerate(messages):
    if cfg.message_format == "qwen3":  # Molmo2's chat turns (official format_messages); no spaces added
      if i % 2 == 0:
        message = ("<|im_end|>\n" if i else "") + f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"
      out.append(message)
      continue
    if cfg.message_format == "role" and i % 2 == 0:
      message = f"User: {message} Assistant:"
    elif cfg.message_format not in ("role", "none", None):
      raise ValueError(f"message_format must be 'role', 'qwen3' or 'none', got {cfg.message_format!r}")
    if i > 0 or cfg.always_start_with_space:
      message = " " + message if message else " "
    out.append(message)
  return out


def _format_one(message, style: str | None, cfg: FormatConfig, *, for_inference: bool, rng,
                image_hw) -> tuple[list[str], dict]:
  if isinstance(message, dict) and "messages" not in message:
    metadata = {k: message[k] for k in METADATA_KEYS if k in message}
    prompt, answer, extra = user_prompt(message, cfg, for_inference=for_inference, rng=rng,
                                        image_hw=image_hw)
    metadata.update(extra)
    messages = [prompt] if for_inference else [prompt, answer]
    style = message.get("style", style)
  else:
    metadata = {}
    messages = list(message["messages"] if isinstance(message, dict) else message)
    if not messages or not all(isinstance(m, str) for m in messages):
      raise ValueError(f"'messages' must be a non-empty list of strings, got {messages!r}")
  if cfg.system_prompt and cfg.system_prompt != "none":
    prefix = style_prefix(style, cfg, for_inference=for_inference, answer=messages[-1], rng=rng)
    if prefix:
      messages[0] = f"{prefix} {messages[0]}" if messages[0] else prefix
  return _chat_messages(messages, cfg), metadata


def format_example(example: dict, cfg: FormatConfig = FINETUNED, *, for_inference: bool = False,
                   rng=None, image_hw: tuple[int, int] | None = None,
                   ) -> tuple[list[list[str]], dict | None]:
  """An example dict -> (conversations, metadata).

  Args:
    example: official example shape: "style" + "question"/"answer(s)", "caption"/"text",
      "label"/"points", "options", "messages" (list of str, user first), or "message_list"
      (several annotations of one image, each formatted as its own conversation).
    cfg: FINETUNED (released fine-tuned models) or CAPTIONER (stage-1 captioning).
    for_inference: only the prompt (no answer).
    rng: numpy RandomState (or anything with randint / random / normal); None = deterministic.
    image_hw: (h, w) of the image, needed for points given in pixels (defaults to the shape of
      an array "image").
  Returns:
    conversations: list of conversations, each a list of messages (user, assistant, ...), every
      message already with its leading space and role markers; one conversation unless the
      example has a "message_list".
    metadata: answers / points / options / option_names for evaluation (None for message_list).
  """
  if image_hw is None and isinstance(example.get("image"), np.ndarray):
    image_hw = example["image"].shape[:2]
  kwargs = dict(for_inference=for_inference, rng=rng, image_hw=image_hw)
  if "message_list" in example:
    return [_format_one(m, m.get("style", example.get("style")), cfg, **kwargs)[0]
            for m in example["message_list"]], None
  if "messages" in example:
    # Unlike the official code (which loses the style here), the example's style is used.
    conversation, metadata = _format_one(example["messages"], example.get("style"), cfg, **kwargs)
    return [conversation], metadata
  conversation, metadata = _format_one(example, example.get("style"), cfg, **kwargs)
  return [conversation], metadata
