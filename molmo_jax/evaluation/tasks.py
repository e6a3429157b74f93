"""Benchmark registry: how each task's Hugging Face rows become prompts and metric records.

Settings follow the official evaluation (spec §6.1, §8.2; allenai/molmo `launch_scripts/utils.py`):
style prefix per dataset, 36 crops ("high-res") except counting and pointing (12), 12 new tokens
for short answers and 192 for counting / pointing, greedy decoding.

A task reads the HF parquet files of its dataset from a local folder (`<data_dir>/<task name>/`,
any layout: files whose name contains the split, e.g. `data/test-00000-of-00001.parquet`, else all
`*.parquet`). Each row becomes a `TaskExample`: an example dict for `data_pipelines.formatting`
(question / options / label + style), the image (bytes or a path), and the metric record (the
fields `metrics.score_record` needs). URL-only datasets (PixMo-Count, PixMo-Points-Eval) must have
their images materialised in an `image` column (bytes or a path) first.
"""
from __future__ import annotations

import ast
import dataclasses
import io
import pathlib
import string
from typing import Any, Callable, Iterator, Optional

import numpy as np

_LETTERS = string.ascii_uppercase


@dataclasses.dataclass
class TaskExample:
    id: str
    example: dict  # formatting input: "question" (+ "options") or "label", and "style"
    image: Any  # encoded bytes, a path, or None
    record: dict  # metric fields (without the prediction)
    masks: Optional[np.ndarray] = None  # bool[N, H, W] (pointing only; kept out of the JSONL)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    metric: str  # a name in metrics.METRICS
    split: str
    max_crops: int
    max_new_tokens: int
    build: Callable[[dict], Optional[dict]]  # row -> {"example", "record", optional "image", "masks"};
    # None skips the row (e.g. ScienceQA questions without an image)
    image_column: str = "image"
    id_column: Optional[str] = None
    source: str = ""  # the HF dataset the folder should hold

    def examples(self, data_dir: str | pathlib.Path, max_examples: Optional[int] = None) -> Iterator[TaskExample]:
        """The task's examples, in file order; ids are `id_column` values or row numbers."""
        yielded = 0
        for index, row in enumerate(read_rows(pathlib.Path(data_dir) / self.name, self.split)):
            if max_examples is not None and yielded >= max_examples:
                return
            try:
                built = self.build(row)
            except (KeyError, ValueError, SyntaxError) as e:
                raise ValueError(f"task {self.name}, row {index}: cannot build an example ({type(e).__name__}: "
                                 f"{e}); the row has columns {sorted(row)}") from e
            if built is None:
                continue
            image = built.get("image", image_value(row.get(self.image_column)))
            example_id = str(row[self.id_column]) if self.id_column and self.id_column in row else str(index)
            yield TaskExample(example_id, built["example"], image, built["record"], built.get("masks"))
            yielded += 1


def image_value(value: Any) -> Any:
    """HF parquet images are structs {"bytes", "path"}; plain bytes / paths pass through."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    return value


def read_rows(folder: pathlib.Path, split: str) -> Iterator[dict]:
    """Rows (dicts) of the split's parquet files under `folder`, in sorted file order."""
    import pyarrow.parquet as pq  # noqa: PLC0415 (only reading benchmarks needs it)
    if not folder.is_dir():
        raise FileNotFoundError(f"benchmark folder {folder} does not exist")
    files = sorted(folder.rglob("*.parquet"))
    chosen = [f for f in files if split in f.relative_to(folder).as_posix()] or files
    if not chosen:
        raise FileNotFoundError(f"no *.parquet files under {folder}")
    for path in chosen:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
            yield from batch.to_pylist()


# ------------------------------------------------------------------------------ row builders

def _answers(values) -> list[str]:
    """A list of strings from plain strings or VQA-style [{"answer": ...}] dicts."""
    values = [values] if isinstance(values, str) else list(values)
    return [v["answer"] if isinstance(v, dict) else str(v) for v in values]


def _short_answer(style: str, question: str = "question", answers: str = "answers") -> Callable:
    def build(row):
        return {"example": {"question": row[question], "style": style},
                "record": {"references": _answers(row[answers])}}
    return build


def _multiple_choice(style: str, options: str, answer: str) -> Callable:
    """Lettered options ("A: ...") in the prompt; the metric picks among the letters, as upstream
    (`option_names`)."""
    def build(row):
        opts = row[options]
        opts = ast.literal_eval(opts) if isinstance(opts, str) else list(opts)
        return {"example": {"question": row["question"], "options": opts, "style": style},
                "record": {"options": list(_LETTERS[:len(opts)]), "answer_idx": int(row[answer])}}
    return build


def _image_only(build: Callable) -> Callable:
    return lambda row: build(row) if image_value(row.get("image")) is not None else None


def _a_okvqa_da(row):
    return {"example": {"question": row["question"], "style": "a_okvqa_da"},
            "record": {"references": list(row["direct_answers"])}}


def _real_world_qa(row):
    """`real_world_qa_no_instruction`: short-answer prompts lose their instruction line."""
    prompt = row["question"]
    if "Please answer directly with a single word or number." in prompt:
        kind, style, prompt = "short_answer", "eval_short_answer", prompt.split("\n")[0]
    else:
        kind, style = "multiple_choice", "eval_multiple_choice"
    return {"example": {"question": prompt, "style": style},
            "record": {"target": row["answer"], "question_type": kind}}


def _mmmu(row):
    multiple_choice = row["question_type"] == "multiple-choice"
    example = {"question": row["question"], "style": "a_okvqa_mc" if multiple_choice else "vqa2"}
    record = {"target": row["answer"], "question_type": row["question_type"]}
    if multiple_choice:
        options = ast.literal_eval(row["options"]) if isinstance(row["options"], str) else list(row["options"])
        example["options"] = options
        record["options"] = options
    return {"example": example, "record": record, "image": image_value(row.get("image_1"))}


def _math_vista(row):
    """Upstream simplifies the question to the text between "Question:" and "Hint:"."""
    question = row["question"].split("Question:")[-1].split("Hint:")[0].strip()
    choices = list(row["choices"]) if row.get("choices") is not None else []
    example = {"question": question, "style": "eval_short_answer"}
    if row["question_type"] == "multi_choice":
        example.update(options=choices, style="eval_multiple_choice")
    return {"example": example, "image": image_value(row.get("decoded_image")),
            "record": {"answer": row["answer"], "question_type": row["question_type"],
                       "answer_type": row["answer_type"], "choices": choices, "precision": row.get("precision")}}


def _count(question_column: Optional[str], count_column: str) -> Callable:
    """Counting in point_count style; without a question the label goes through the (first)
    counting prompt template."""
    def build(row):
        example = {"style": "point_count"}
        if question_column:
            example["question"] = row[question_column]
        else:
            example["label"] = row["label"]
        return {"example": example, "record": {"gt_count": int(row[count_column])}}
    return build


def _image_wh(source: Any) -> list[int]:
    from PIL import Image  # noqa: PLC0415
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return list(image.size)


def _pointing(row):
    """PixMo-Points-Eval: GT points in pixels and one mask per point (bool[N, H, W]); "not present"
    rows have no points and no masks (their score does not depend on the image size)."""
    points = [[p["x"], p["y"]] for p in row["points"]]
    if not points:
        w, h = _image_wh(image_value(row["image"]))
        return {"example": {"label": row["label"], "style": "pointing"}, "masks": np.zeros((0, h, w), bool),
                "record": {"gt_points_px": [], "image_wh": [w, h]}}
    masks = np.asarray(row["masks"], bool)
    if masks.ndim != 3 or len(masks) != len(points):
        raise ValueError(f"masks must be bool[N, H, W] with N = {len(points)} points, got shape {masks.shape}")
    h, w = masks.shape[1:]
    return {"example": {"label": row["label"], "style": "pointing"}, "masks": masks,
            "record": {"gt_points_px": points, "image_wh": [w, h]}}


TASKS = {t.name: t for t in [
    Task("chart_qa", "relaxed_correctness", "test", 36, 12, _short_answer("chart_qa", "query", "label"),
         source="HuggingFaceM4/ChartQA"),
    Task("doc_qa", "anls", "validation", 36, 12, _short_answer("doc_qa"), id_column="questionId",
         source="HuggingFaceM4/DocumentVQA"),
    Task("info_qa", "anls", "validation", 36, 12, _short_answer("info_qa"), id_column="questionId",
         source="HuggingFaceM4/InfographicVQA"),
    Task("text_vqa", "vqa_score", "validation", 36, 12, _short_answer("text_vqa"), id_column="question_id",
         source="facebook/textvqa"),
    Task("vqa2", "vqa_score", "validation", 36, 12, _short_answer("vqa2"), id_column="question_id",
         source="HuggingFaceM4/VQAv2"),
    Task("okvqa", "vqa_score", "validation", 36, 12, _short_answer("okvqa"), id_column="question_id",
         source="HuggingFaceM4/OK-VQA"),
    Task("a_okvqa_mc", "multiple_choice", "validation", 36, 12,
         _multiple_choice("a_okvqa_mc", "choices", "correct_choice_idx"), id_column="question_id",
         source="HuggingFaceM4/A-OKVQA"),
    Task("a_okvqa_da", "a_okvqa", "validation", 36, 12, _a_okvqa_da, id_column="question_id",
         source="HuggingFaceM4/A-OKVQA"),
    Task("ai2d", "multiple_choice", "test", 36, 12, _multiple_choice("ai2_diagram", "options", "answer"),
         source="lmms-lab/ai2d (opaque boxes; the paper's transparent-box variant is not on the hub)"),
    Task("science_qa_img", "multiple_choice", "test", 36, 12, _image_only(_multiple_choice("science_qa", "choices", "answer")),
         source="derek-thomas/ScienceQA (rows with an image)"),
    Task("real_world_qa", "real_world_qa", "test", 36, 12, _real_world_qa, source="xai-org/RealworldQA"),
    Task("mmmu", "mmmu", "validation", 36, 12, _mmmu, id_column="id", source="MMMU/MMMU"),
    Task("math_vista", "math_vista", "testmini", 36, 12, _math_vista, id_column="pid",
         source="AI4Math/MathVista (scored with the no-judge fallback)"),
    Task("countbench_qa", "point_count", "test", 12, 192, _count("question", "number"),
         source="nielsr/countbench joined with the big_vision CountBenchQA questions (a 'question' column)"),
    Task("pixmo_count", "point_count", "test", 12, 192, _count(None, "count"),
         source="allenai/pixmo-count (with an 'image' column)"),
    Task("pointing_eval", "pointing", "test", 12, 192, _pointing,
         source="allenai/pixmo-points-eval (with an 'image' column)"),
]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
