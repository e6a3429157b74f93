"""PixMo sources: each set's Hugging Face parquet files, as published, -> Molmo example dicts.

A folder per set holds the files of the HF repo (`pixmo-points/data/train-00000-of-00002.parquet`,
`pixmo-docs/charts/train-*.parquet`, ...). URL-based sets need the image cache of
`data_pipelines.download` (`image_dir`); examples whose image is not cached are skipped and counted
in `source.stats`, so a mixture keeps working with the usual 20-25 % of dead URLs.

Rows are grouped per image: all annotations of one image URL become one example with a
"message_list" (packed into one sequence later, spec §4.6). Sets published with a train split only
get a validation split carved deterministically: the `n_val` images with the smallest sha256(URL)
(independent of row order and of which images happen to be downloaded). Every source is random
access (`len`, `[i]`, `get(i, rng)`), so it plugs into `grain.MapDataset.source`.

Kept from the official loaders (allenai/molmo `olmo/data/pixmo_datasets.py`), on purpose:
- PixMo-Points "counting" variants use style "pointing" and the plain variants "point_count"
  (the official `mode = "pointing" if counting else "point_count"`, spec §4.5); PixMo-Count is not inverted.
- The high-frequency split is `collection_method == "counting"`, the basic split "pointing".
- Points-eval images are held out of PixMo-Points training.
Differences: points are passed in pixels as the dataset cards publish them (no `point_scale`, the
formatter divides by the image size); expressions with more than 40 points are dropped (paper §3);
the "how many" no-pointing prefix goes in front of the question it belongs to.
"""
import collections
import glob
import hashlib
import os
import re
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.download import ImageCache

URL_SETS = ("pixmo-cap", "pixmo-ask-model-anything", "pixmo-cap-qa", "pixmo-points",
            "pixmo-point-explanations", "pixmo-count", "pixmo-points-eval")
DOC_TYPES = ("charts", "tables", "diagrams", "other")
MAX_POINTS = 40
CAP_MODES = ("captions", "transcripts", "transcript_and_caption", "transcript1_and_caption")
# Said in front of "how many ..." questions of AMA / CapQA so the model answers them without pointing.
NO_POINT_PREFIXES = ("No pointing: ", "Answer without pointing: ", "Do not point. ", "Without points: ",
                     "Don't use points. ", "Reply in text only, no points:\n", "No points please.\n")
CLOCK_TIME = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?\s*([AaPp][Mm])?")


def read_parquet(folder: str, split: str, columns: Sequence[str], optional: Sequence[str] = ()) -> pa.Table:
    """All `{split}-*.parquet` (or `{split}.parquet`) files under `folder`, as one table."""
    files = sorted({f for pattern in (f"{split}-*.parquet", f"{split}.parquet")
                    for f in glob.glob(os.path.join(folder, "**", pattern), recursive=True)})
    if not files:
        raise FileNotFoundError(f"no {split}-*.parquet files under {folder}")
    tables = []
    for file in files:
        names = pq.ParquetFile(file).schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{file}: columns {missing} missing (found {names}); expected the published schema")
        tables.append(pq.read_table(file, columns=list(columns) + [c for c in optional if c in names]))
    return pa.concat_tables(tables, promote_options="default")


def image_urls(folder: str) -> list[tuple[str, str | None]]:
    """Unique (image_url, image_sha256 or None) of every split of a URL-based set, in file order."""
    files = sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no parquet files under {folder}")
    urls: dict[str, str | None] = {}
    for file in files:
        names = pq.ParquetFile(file).schema_arrow.names
        if "image_url" not in names:
            raise ValueError(f"{file}: no image_url column (found {names})")
        table = pq.read_table(file, columns=["image_url"] + (["image_sha256"] if "image_sha256" in names else []))
        shas = table.column("image_sha256").to_pylist() if "image_sha256" in names else [None] * len(table)
        for url, sha in zip(table.column("image_url").to_pylist(), shas):
            urls.setdefault(url, sha)
    return list(urls.items())


def points_xy(points) -> np.ndarray:
    """[{x, y}, ...] or [[x, y], ...] -> float32[N, 2]."""
    if len(points) == 0:
        return np.zeros((0, 2), np.float32)
    if isinstance(points[0], dict):
        return np.array([[p["x"], p["y"]] for p in points], np.float32)
    return np.asarray(points, np.float32).reshape(-1, 2)


def validation_keys(keys: Sequence[str], n_val: int) -> set[str]:
    """The `n_val` keys with the smallest sha256: a split that only depends on the keys themselves."""
    return set(sorted(set(keys), key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest())[:n_val])


class PixmoSource:
    """Random-access examples of one set: `records` turned into example dicts by `make_example`."""

    def __init__(self, name: str, records: list, make_example: Callable, stats: dict, seed: int = 0):
        self.name, self.records, self.make_example, self.stats, self.seed = name, records, make_example, stats, seed

    def __len__(self) -> int:
        return len(self.records)

    def get(self, index: int, rng: np.random.RandomState) -> dict:
        """The example at `index`; `rng` draws the per-epoch choices (transcript, no-pointing prefix)."""
        return self.make_example(self.records[index], rng)

    def __getitem__(self, index: int) -> dict:
        return self.get(index, np.random.RandomState([self.seed, index]))

    def __repr__(self) -> str:  # grain checks a restored state against repr(source)
        return f"PixmoSource({self.name!r}, n={len(self)}, seed={self.seed})"


def _grouped_url_source(name: str, table: pa.Table, split: str, image_dir: str | None, n_val: int | None,
                        make_example: Callable, keep_row: Callable = lambda row: True) -> PixmoSource:
    """Groups rows per image_url, carves the split, drops images missing from the cache."""
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    rows = table.to_pylist()
    for row in rows:
        if keep_row(row):
            groups[row["image_url"]].append(row)
    if n_val is not None:
        if split not in ("train", "validation"):
            raise ValueError(f"{name}: split must be train or validation, got {split!r}")
        val = validation_keys(list(groups), n_val)
        groups = {u: g for u, g in groups.items() if (u in val) == (split == "validation")}
    records, missing = _with_images(groups.items(), image_dir)
    stats = {"rows": len(rows), "kept_rows": sum(len(g) for g in groups.values()), "images": len(groups),
             "missing_images": missing}
    return PixmoSource(name, records, make_example, stats)


def _with_images(groups, image_dir: str | None) -> tuple[list, int]:
    if image_dir is None:
        raise ValueError("this PixMo set stores image URLs: pass image_dir, the cache of data_pipelines.download")
    cache, records, missing = ImageCache(image_dir), [], 0
    for url, rows in groups:
        path = cache.lookup(url)
        if path is None:
            missing += 1
        else:
            records.append((path, url, rows))
    return records, missing


def _base(path: str, url: str, rows: list[dict], **metadata) -> dict:
    sha = rows[0].get("image_sha256")
    return {"image": path, "metadata": dict(image_url=url, **({"image_sha256": sha} if sha else {}), **metadata)}


def _no_point_prefix(question: str, rng: np.random.RandomState) -> str:
    if re.fullmatch("how many.*", question.lower(), flags=re.DOTALL):
        return NO_POINT_PREFIXES[rng.randint(0, len(NO_POINT_PREFIXES))] + question
    return question


def pixmo_cap(folder: str, image_dir: str, split: str, mode: str = "captions", n_val: int = 2048) -> PixmoSource:
    """PixMo-Cap: `long_caption` captions and/or `transcript` audio transcripts (stage-1 data)."""
    if mode not in CAP_MODES:
        raise ValueError(f"pixmo_cap mode {mode!r} not in {CAP_MODES}")

    def make_example(record, rng):
        path, url, rows = record
        messages = []
        for row in rows:
            if mode != "transcripts":
                messages.append({"text": row["caption"], "style": "long_caption"})
            transcripts = row["transcripts"] or []
            if mode == "transcripts":
                messages += [{"text": t, "style": "transcript"} for t in transcripts]
            elif mode != "captions" and transcripts:
                pick = rng.randint(0, len(transcripts)) if mode == "transcript_and_caption" else 0
                messages.append({"text": transcripts[pick], "style": "transcript"})
        return dict(_base(path, url, rows), message_list=messages)

    table = read_parquet(folder, "train", ["image_url", "caption", "transcripts"])
    return _grouped_url_source(f"pixmo_cap[{mode}]", table, split, image_dir, n_val, make_example)


def pixmo_ask_model_anything(folder: str, image_dir: str, split: str, n_val: int = 2048) -> PixmoSource:
    """PixMo-AMA: human-written `user_qa` questions and answers, several per image."""
    def make_example(record, rng):
        path, url, rows = record
        return dict(_base(path, url, rows), message_list=[
            {"question": _no_point_prefix(r["question"], rng), "answer": r["answer"], "style": "user_qa"}
            for r in rows])

    table = read_parquet(folder, "train", ["image_url", "image_sha256", "question", "answer"])
    return _grouped_url_source("pixmo_ask_model_anything", table, split, image_dir, n_val, make_example)


def pixmo_cap_qa(folder: str, image_dir: str, split: str, n_val: int = 2048) -> PixmoSource:
    """PixMo-CapQA: `synthetic_qa` conversations (`messages`, user/assistant alternating)."""
    def make_example(record, rng):
        path, url, rows = record
        convs = []
        for row in rows:
            turns = list(row.get("messages") or [row["question"], row["answer"]])
            turns[::2] = [_no_point_prefix(q, rng) for q in turns[::2]]
            convs.append({"messages": turns, "style": "synthetic_qa"})
        return dict(_base(path, url, rows), message_list=convs)

    table = read_parquet(folder, "train", ["image_url", "question", "answer"], optional=["messages"])
    return _grouped_url_source("pixmo_cap_qa", table, split, image_dir, n_val, make_example)


def pixmo_points(folder: str, image_dir: str, split: str, kind: str = "basic", counting: bool = False,
                 exclude_urls: Sequence[str] = (), n_val: int = 2048, max_points: int = MAX_POINTS) -> PixmoSource:
    """PixMo-Points: pointing expressions (pixel points) grouped per image.

    kind: "basic" (collection_method "pointing"), "high_frequency" ("counting") or "both".
    counting: the official flag, with its inverted style (True -> "pointing", False -> "point_count").
    exclude_urls: images of PixMo-Points-Eval, held out of training.
    """
    methods = {"basic": ("pointing",), "high_frequency": ("counting",), "both": ("counting", "pointing")}
    if kind not in methods:
        raise ValueError(f"pixmo_points kind {kind!r} not in {list(methods)}")
    style = "pointing" if counting else "point_count"
    excluded = set(exclude_urls)

    def make_example(record, rng):
        path, url, rows = record
        return dict(_base(path, url, rows), message_list=[
            {"label": r["label"], "points": points_xy(r["points"]), "style": style} for r in rows])

    table = read_parquet(folder, "train", ["image_url", "image_sha256", "points", "count", "label",
                                           "collection_method"])
    parts = [_grouped_url_source(
        f"pixmo_points[{method}]", table, split, image_dir, n_val, make_example,
        keep_row=lambda r, m=method: (r["collection_method"] == m and len(r["points"]) <= max_points
                                      and r["image_url"] not in excluded))
        for method in methods[kind]]
    stats = {k: sum(p.stats[k] for p in parts) for k in parts[0].stats}
    return PixmoSource(f"pixmo_points[{kind},counting={counting}]", [r for p in parts for r in p.records],
                       make_example, stats)


def pixmo_point_explanations(folder: str, image_dir: str, split: str, split_groups: bool = True,
                             n_val: int = 1024) -> PixmoSource:
    """PixMo-Point-Explanations: `point_qa` answers whose `<|POINT|>` placeholders get point tags.

    split_groups: an image with several questions becomes two examples (the official default).
    """
    def make_example(record, rng):
        path, url, rows = record
        return dict(_base(path, url, rows), message_list=[{
            "question": r["question"], "answer": r["parsed_response"], "style": "point_qa",
            "answer_annotations": [{"points": points_xy(p), "inline_text": i, "alt_text": a}
                                   for p, i, a in zip(r["points"], r["inline_text"], r["alt_text"])]}
            for r in rows])

    table = read_parquet(folder, "train", ["image_url", "question", "parsed_response", "alt_text", "inline_text",
                                           "points"], optional=["image_sha256"])
    source = _grouped_url_source("pixmo_point_explanations", table, split, image_dir, n_val, make_example,
                                 keep_row=lambda r: r["parsed_response"] is not None)
    if split_groups:
        halves = []
        for path, url, rows in source.records:
            n = (len(rows) + 1) // 2
            halves += [(path, url, rows[:n])] + ([(path, url, rows[n:])] if len(rows) > 1 else [])
        source.records = halves
    return source


def pixmo_count(folder: str, image_dir: str, split: str, counting: bool = False) -> PixmoSource:
    """PixMo-Count (published train/validation/test): style "point_count" if counting else "pointing".
    Points (pixels) are given for train only; validation/test carry the human-checked count."""
    style = "point_count" if counting else "pointing"

    def make_example(record, rng):
        path, url, rows = record
        row = rows[0]
        out = dict(_base(path, url, rows, count=row["count"]), label=row["label"], style=style)
        if split == "train":
            out["points"] = points_xy(row["points"])
        return out

    table = read_parquet(folder, split, ["image_url", "image_sha256", "count", "points", "label"])
    rows = table.to_pylist()
    records, missing = _with_images(((r["image_url"], [r]) for r in rows), image_dir)
    return PixmoSource(f"pixmo_count[{split},counting={counting}]", records, make_example,
                       {"rows": len(rows), "kept_rows": len(rows), "images": len(rows), "missing_images": missing})


def pixmo_points_eval(folder: str, image_dir: str, split: str = "test") -> PixmoSource:
    """PixMo-Points-Eval: one expression per example; metadata has the pixel points and the
    SAM masks bool[N, H, W] the pointing metric scores against (eval-and-data.md §B4)."""
    def make_example(record, rng):
        path, url, rows = record
        row = rows[0]
        points = points_xy(row["points"])
        return dict(_base(path, url, rows, points=points, masks=row["masks"]),
                    label=row["label"], points=points, style="pointing")

    table = read_parquet(folder, split, ["image_url", "image_sha256", "label", "points", "masks"])
    masks = [_bool_cube(table.column("masks")[i]) for i in range(len(table))]
    rows = table.drop_columns(["masks"]).to_pylist()
    records, missing = _with_images(((r["image_url"], [dict(r, masks=m)]) for r, m in zip(rows, masks)), image_dir)
    return PixmoSource("pixmo_points_eval", records, make_example,
                       {"rows": len(rows), "kept_rows": len(rows), "images": len(rows), "missing_images": missing})


def _bool_cube(value: pa.Scalar) -> np.ndarray:
    """list<list<list<bool>>> scalar -> bool[N, H, W] without a Python list per pixel."""
    masks = value.values
    if masks is None or len(masks) == 0:
        return np.zeros((0, 0, 0), bool)
    rows = masks.flatten()
    pixels = rows.flatten().to_numpy(zero_copy_only=False)
    return pixels.reshape(len(masks), len(rows) // len(masks), -1).astype(bool)


def pixmo_docs(folder: str, doc_type: str, split: str) -> PixmoSource:
    """PixMo-Docs (images embedded; configs charts/tables/diagrams/other): QAs of style
    `pixmo_docs_{doc_type}`. Images are read lazily, one parquet row group at a time."""
    if doc_type not in DOC_TYPES:
        raise ValueError(f"pixmo_docs doc_type {doc_type!r} not in {DOC_TYPES}")
    config_folder = os.path.join(folder, doc_type) if os.path.isdir(os.path.join(folder, doc_type)) else folder
    style = f"pixmo_docs_{doc_type}"
    files = sorted(glob.glob(os.path.join(config_folder, "**", f"{split}-*.parquet"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no {split}-*.parquet files under {config_folder}")
    records = []
    for file in files:
        parquet = pq.ParquetFile(file)
        for column in ("image", "image_id", "questions"):
            if column not in parquet.schema_arrow.names:
                raise ValueError(f"{file}: column {column!r} missing (found {parquet.schema_arrow.names})")
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=["image_id", "questions"])
            records += [(file, group, i, row) for i, row in enumerate(table.to_pylist())]
    images = _RowGroupImages()

    def make_example(record, rng):
        file, group, offset, row = record
        return {"image": images.get(file, group, offset), "metadata": {"image_id": row["image_id"]},
                "message_list": [{"question": q, "answer": a, "style": style} for q, a in _qa_pairs(row["questions"])]}

    return PixmoSource(f"pixmo_docs[{doc_type},{split}]", records, make_example,
                       {"rows": len(records), "kept_rows": len(records), "images": len(records), "missing_images": 0})


def _qa_pairs(questions) -> list[tuple[str, str]]:
    """HF `Sequence({question, answer})` is stored as {question: [...], answer: [...]}; accept a list too."""
    if isinstance(questions, dict):
        return list(zip(questions["question"], questions["answer"]))
    return [(q["question"], q["answer"]) for q in questions]


class _RowGroupImages:
    """Image bytes of embedded-image parquet files, keeping the last row group read in memory."""

    def __init__(self):
        self.key, self.column = None, None

    def get(self, file: str, group: int, offset: int) -> bytes:
        if self.key != (file, group):
            self.column = pq.ParquetFile(file).read_row_group(group, columns=["image"]).column("image")
            self.key = (file, group)
        value = self.column[offset].as_py()
        return value["bytes"] if isinstance(value, dict) else value


def pixmo_clocks(folder: str, split: str) -> PixmoSource:
    """PixMo-Clocks metadata (no images are published: the synthetic clock renderer draws them).

    Yields style "clocks", the answer text and metadata hour (0-11, 12 -> 0 as in the clock
    eval), minute, second (-1 when not shown) plus every published field."""
    fields = ["example_id", "watchface_id", "watchface_name", "watch_time", "time_format", "shows_seconds",
              "hour_visible", "minute_visible", "second_visible", "text"]
    table = read_parquet(folder, split, fields)

    def make_example(row, rng):
        match = CLOCK_TIME.search(str(row["watch_time"])) or CLOCK_TIME.search(str(row["text"]))
        if match is None:
            raise ValueError(f"pixmo_clocks example {row['example_id']}: cannot read a time from "
                             f"watch_time={row['watch_time']!r} / text={row['text']!r}")
        hour, minute, second, _ = match.groups()
        seconds = int(second) if second is not None and row["shows_seconds"] else -1
        return {"style": "clocks", "question": "What time is being shown?", "answer": row["text"],
                "metadata": dict(row, hour=int(hour) % 12, minute=int(minute), second=seconds)}

    rows = table.to_pylist()
    return PixmoSource(f"pixmo_clocks[{split}]", rows, make_example,
                       {"rows": len(rows), "kept_rows": len(rows), "images": 0, "missing_images": 0})


def eval_image_urls(data_dir: str) -> list[str]:
    """Image URLs of PixMo-Points-Eval (held out of PixMo-Points training)."""
    folder = os.path.join(data_dir, "pixmo-points-eval")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is missing: PixMo-Points training holds out the pointing-eval images; "
                                "download allenai/pixmo-points-eval there (or build pixmo_points with exclude_urls=())")
    return read_parquet(folder, "test", ["image_url"]).column("image_url").to_pylist()


# Official dataset names (spec §5.3 mixture entries) -> (HF folder, builder, fixed arguments).
SOURCES = {
    "pixmo_cap": ("pixmo-cap", pixmo_cap, {"mode": "captions"}),
    "pixmo_cap_with_transcripts": ("pixmo-cap", pixmo_cap, {"mode": "transcript_and_caption"}),
    "pixmo_ask_model_anything": ("pixmo-ask-model-anything", pixmo_ask_model_anything, {}),
    "pixmo_cap_qa": ("pixmo-cap-qa", pixmo_cap_qa, {}),
    "pixmo_points": ("pixmo-points", pixmo_points, {"kind": "basic", "counting": False}),
    "pixmo_points_counting": ("pixmo-points", pixmo_points, {"kind": "basic", "counting": True}),
    "pixmo_points_high_freq": ("pixmo-points", pixmo_points, {"kind": "high_frequency", "counting": False}),
    "pixmo_points_high_freq_counting": ("pixmo-points", pixmo_points, {"kind": "high_frequency", "counting": True}),
    "pixmo_pointing_explanations": ("pixmo-point-explanations", pixmo_point_explanations, {}),
    "pixmo_count": ("pixmo-count", pixmo_count, {"counting": False}),
    "pixmo_count_counting": ("pixmo-count", pixmo_count, {"counting": True}),
    "pixmo_points_eval": ("pixmo-points-eval", pixmo_points_eval, {}),
    **{f"pixmo_docs_{t}": ("pixmo-docs", pixmo_docs, {"doc_type": t}) for t in DOC_TYPES},
    "pixmo_clocks": ("pixmo-clocks", pixmo_clocks, {}),
}


def load(name: str, data_dir: str, split: str, image_dir: str | None = None, **overrides) -> PixmoSource:
    """Source `name` (a key of SOURCES) from `data_dir/<HF folder>`; image_dir for URL-based sets;
    `overrides` go to the builder (e.g. n_val)."""
    if name not in SOURCES:
        raise KeyError(f"unknown PixMo source {name!r}; known: {sorted(SOURCES)}")
    folder_name, builder, kwargs = SOURCES[name]
    folder = os.path.join(data_dir, folder_name)
    if folder_name in URL_SETS:
        kwargs = dict(kwargs, image_dir=image_dir)
    if builder is pixmo_points:
        kwargs = dict(kwargs, exclude_urls=eval_image_urls(data_dir))
    return builder(folder, split=split, **kwargs, **overrides)
