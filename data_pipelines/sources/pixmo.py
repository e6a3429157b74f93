"""PixMo sources: each set's Hugging Face parquet files, as published, -> Molmo example dicts.

A folder per set holds the files of the HF repo (`pixmo-points/data/train-00000-of-00002.parquet`,
`pixmo-docs/charts/train-*.parquet`, ...). URL-based sets need the image cache of
`data_pipelines.download` (`image_dir`); examples whose image is not cached are skipped and counted
in `source.stats`, so a mixture keeps working with the usual 20-25 % of dead URLs.

Rows are grouped per image: all annotations of one image URL become one example with a
"message_list" (packed into one sequence later, spec §4.6). Sets published with a train split only
get a validation split carved deterministically: the `n_val` images with the smallest sha256(URL)
(independent of row order and of which images happen to be downloaded). Every source is random
access (`len`, `[i]`, `get(i, rng)`) and picklable, so it plugs into `grain.MapDataset.source`.

A source is `records` (image, key, annotation rows) plus a module-level `example` function with the
variant's arguments; the TFDS builder stores the records with their image bytes, so the variants of one
set (e.g. the four PixMo-Points mixture entries) share one prepared copy.

Kept from the official loaders (allenai/molmo `olmo/data/pixmo_datasets.py`), on purpose:
- PixMo-Points "counting" variants use style "pointing" and the plain variants "point_count"
  (the official `mode = "pointing" if counting else "point_count"`, spec §4.5); PixMo-Count is not inverted.
- The high-frequency split is `collection_method == "counting"`, the basic split "pointing".
- Points-eval images are held out of PixMo-Points training.
Differences: the PixMo-Points card says pixels while the official loader passes `point_scale=100`;
`points_records` checks the data itself (see there) instead of trusting either. Expressions with
more than 40 points are dropped (paper §3); the "how many" no-pointing prefix goes in front of the
question it belongs to.
"""
import collections
import dataclasses
import functools
import glob
import hashlib
import os
import re
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.image_cache import ImageCache

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
    """Unique (image_url, image_sha256 or None) of every split of a URL-based set, in file order
    (the URLs of an `image_urls` list column for the Molmo2 multi-image sets)."""
    files = sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no parquet files under {folder}")
    urls: dict[str, str | None] = {}
    for file in files:
        names = pq.ParquetFile(file).schema_arrow.names
        if "image_urls" in names and "image_url" not in names:  # Molmo2 multi-image sets: a list per row
            for row in pq.read_table(file, columns=["image_urls"]).column("image_urls").to_pylist():
                for url in row or ():
                    urls.setdefault(url, None)
            continue
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


@dataclasses.dataclass(frozen=True)
class DocImage:
    """Where an embedded image lives: parquet file, row group, row within the group (read lazily)."""
    file: str
    group: int
    row: int


@functools.lru_cache(maxsize=2)
def _row_group_images(file: str, group: int) -> pa.ChunkedArray:
    return pq.ParquetFile(file).read_row_group(group, columns=["image"]).column("image")


def image_bytes_or_path(image):
    """Record image -> what examples carry: a cache path (str), bytes, or None (no image)."""
    if isinstance(image, DocImage):
        value = _row_group_images(image.file, image.group)[image.row].as_py()
        return value["bytes"] if isinstance(value, dict) else value
    return image


class PixmoSource:
    """Random-access examples: `records[i]` = (image, key, rows) turned into a dict by `make_example`."""

    def __init__(self, name: str, records: list, make_example: Callable, stats: dict | None = None, seed: int = 0):
        self.name, self.records, self.make_example, self.seed = name, records, make_example, seed
        self.stats = stats or {}

    def __len__(self) -> int:
        return len(self.records)

    def get(self, index: int, rng: np.random.RandomState) -> dict:
        """The example at `index`; `rng` draws the per-epoch choices (transcript, no-pointing prefix)."""
        image, key, rows = self.records[index]
        return self.make_example((image_bytes_or_path(image), key, rows), rng)

    def __getitem__(self, index: int) -> dict:
        return self.get(index, np.random.RandomState([self.seed, index]))

    def __repr__(self) -> str:  # grain checks a restored state against repr(source)
        return f"PixmoSource({self.name!r}, n={len(self)}, seed={self.seed})"


# ---------------------------------------------------------------------------------------------------
# Records: (image, key, rows) per example, read from the parquet of one split.

def url_records(folder: str, split: str, image_dir: str | None, columns: Sequence[str],
                optional: Sequence[str] = (), n_val: int = 2048,
                keep_row: Callable = lambda row: True) -> tuple[list, dict]:
    """Train-only URL sets: rows grouped per image_url, the split carved, uncached images dropped."""
    if split not in ("train", "validation"):
        raise ValueError(f"{folder}: split must be train or validation (carved from train), got {split!r}")
    rows = read_parquet(folder, "train", columns, optional).to_pylist()
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        if keep_row(row):
            groups[row["image_url"]].append(row)
    val = validation_keys(list(groups), n_val)
    groups = {u: g for u, g in groups.items() if (u in val) == (split == "validation")}
    records, missing = _cached(groups.items(), image_dir)
    return records, {"rows": len(rows), "kept_rows": sum(map(len, groups.values())), "images": len(groups),
                     "missing_images": missing}


def row_records(folder: str, split: str, image_dir: str | None, columns: Sequence[str]) -> tuple[list, dict]:
    """Sets with published splits and one row per example (PixMo-Count, PixMo-Points-Eval)."""
    table = read_parquet(folder, split, columns)
    masks = [_bool_cube(v) for v in table.column("masks")] if "masks" in columns else None
    rows = table.drop_columns(["masks"] if masks else []).to_pylist()
    if masks:
        rows = [dict(r, masks=m) for r, m in zip(rows, masks)]
    records, missing = _cached(((r["image_url"], [r]) for r in rows), image_dir)
    return records, {"rows": len(rows), "kept_rows": len(rows), "images": len(rows), "missing_images": missing}


def _cached(groups, image_dir: str | None) -> tuple[list, int]:
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


def _bool_cube(value: pa.Scalar) -> np.ndarray:
    """list<list<list<bool>>> scalar -> bool[N, H, W] without a Python list per pixel."""
    masks = value.values
    if masks is None or len(masks) == 0:
        return np.zeros((0, 0, 0), bool)
    rows = masks.flatten()
    pixels = rows.flatten().to_numpy(zero_copy_only=False)
    return pixels.reshape(len(masks), len(rows) // len(masks), -1).astype(bool)


def points_records(folder: str, split: str, image_dir: str | None, kind: str = "basic",
                   exclude_urls: Sequence[str] = (), n_val: int = 2048, max_points: int = MAX_POINTS,
                   point_units: str = "auto"):
    """PixMo-Points, kind "basic" (collection_method "pointing") or "high_frequency" ("counting");
    drops expressions with more than `max_points` points and the `exclude_urls` (points-eval images).

    point_units: "pixels" (the dataset card), "percent" (what the official loader assumes with
    `point_scale=100`) or "auto": percent only if no coordinate of the split exceeds 100, which
    pixel coordinates of thousands of web images always do. Percent rows get `point_scale` 100.
    """
    methods = {"basic": "pointing", "high_frequency": "counting"}
    if kind not in methods:
        raise ValueError(f"PixMo-Points kind {kind!r} not in {list(methods)}")
    if point_units not in ("auto", "pixels", "percent"):
        raise ValueError(f"PixMo-Points point_units {point_units!r} not in ('auto', 'pixels', 'percent')")
    excluded = set(exclude_urls)
    records, stats = url_records(
        folder, split, image_dir, ["image_url", "image_sha256", "points", "count", "label", "collection_method"],
        n_val=n_val, keep_row=lambda r: (r["collection_method"] == methods[kind] and len(r["points"]) <= max_points
                                         and r["image_url"] not in excluded))
    if point_units == "auto":
        largest = max((max(p["x"], p["y"]) for _, _, rows in records for r in rows for p in r["points"]), default=None)
        point_units = "unknown" if largest is None else "pixels" if largest > 100 else "percent"
    stats["point_units"] = point_units
    if point_units == "percent":
        for _, _, rows in records:
            for row in rows:
                row["point_scale"] = 100
    return records, stats


def point_explanation_records(folder: str, split: str, image_dir: str | None, n_val: int = 1024,
                              split_groups: bool = True):
    """PixMo-Point-Explanations without unparsed responses; with `split_groups` (the official
    default) an image with several questions becomes two examples."""
    records, stats = url_records(
        folder, split, image_dir, ["image_url", "question", "parsed_response", "alt_text", "inline_text", "points"],
        optional=["image_sha256"], n_val=n_val, keep_row=lambda r: r["parsed_response"] is not None)
    if split_groups:
        halves = []
        for path, url, rows in records:
            n = (len(rows) + 1) // 2
            halves += [(path, url, rows[:n])] + ([(path, url, rows[n:])] if len(rows) > 1 else [])
        records = halves
    return records, stats


def docs_records(folder: str, split: str, image_dir=None, doc_type: str = "charts"):
    """PixMo-Docs config `doc_type`; images stay in the parquet until an example is read."""
    if doc_type not in DOC_TYPES:
        raise ValueError(f"PixMo-Docs doc_type {doc_type!r} not in {DOC_TYPES}")
    config_folder = os.path.join(folder, doc_type) if os.path.isdir(os.path.join(folder, doc_type)) else folder
    files = sorted(glob.glob(os.path.join(config_folder, "**", f"{split}-*.parquet"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no {split}-*.parquet files under {config_folder}")
    records = []
    for file in files:
        parquet = pq.ParquetFile(file)
        missing = [c for c in ("image", "image_id", "questions") if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"{file}: columns {missing} missing (found {parquet.schema_arrow.names})")
        for group in range(parquet.num_row_groups):
            rows = parquet.read_row_group(group, columns=["image_id", "questions"]).to_pylist()
            records += [(DocImage(file, group, i), row["image_id"], [row]) for i, row in enumerate(rows)]
    return records, {"rows": len(records), "kept_rows": len(records), "images": len(records), "missing_images": 0}


CLOCK_FIELDS = ("example_id", "watchface_id", "watchface_name", "watch_time", "time_format", "shows_seconds",
                "hour_visible", "minute_visible", "second_visible", "text")


def clock_records(folder: str, split: str, image_dir=None):
    """PixMo-Clocks metadata rows (no images are published; the synthetic clock renderer draws them)."""
    rows = read_parquet(folder, split, CLOCK_FIELDS).to_pylist()
    return [(None, row["example_id"], [row]) for row in rows], {
        "rows": len(rows), "kept_rows": len(rows), "images": 0, "missing_images": 0}


# ---------------------------------------------------------------------------------------------------
# Examples: record -> Molmo example dict (module-level functions, so sources pickle into grain workers).

def _base(record, **fields) -> dict:
    image, key, rows = record
    sha = rows[0].get("image_sha256")
    metadata = {"image_url": key, **({"image_sha256": sha} if sha else {})}
    return {"image": image, "metadata": {**metadata, **fields.pop("metadata", {})}, **fields}


def no_point_prefix(question: str, rng: np.random.RandomState) -> str:
    if re.fullmatch("how many.*", question.lower(), flags=re.DOTALL):
        return NO_POINT_PREFIXES[rng.randint(0, len(NO_POINT_PREFIXES))] + question
    return question


def cap_example(record, rng, mode: str = "captions") -> dict:
    """PixMo-Cap: `long_caption` captions and/or `transcript` audio transcripts (CAP_MODES)."""
    if mode not in CAP_MODES:
        raise ValueError(f"PixMo-Cap mode {mode!r} not in {CAP_MODES}")
    messages = []
    for row in record[2]:
        transcripts = row["transcripts"] or []
        if mode != "transcripts":
            messages.append({"text": row["caption"], "style": "long_caption"})
        if mode == "transcripts":
            messages += [{"text": t, "style": "transcript"} for t in transcripts]
        elif mode != "captions" and transcripts:
            pick = rng.randint(0, len(transcripts)) if mode == "transcript_and_caption" else 0
            messages.append({"text": transcripts[pick], "style": "transcript"})
    return _base(record, message_list=messages)


def ask_model_anything_example(record, rng) -> dict:
    """PixMo-AMA: human-written `user_qa` questions and answers."""
    return _base(record, message_list=[
        {"question": no_point_prefix(r["question"], rng), "answer": r["answer"], "style": "user_qa"}
        for r in record[2]])


def cap_qa_example(record, rng, style: str = "synthetic_qa") -> dict:
    """PixMo-CapQA: `style` conversations (`messages`, user/assistant alternating)."""
    convs = []
    for row in record[2]:
        turns = list(row.get("messages") or [row["question"], row["answer"]])
        turns[::2] = [no_point_prefix(q, rng) for q in turns[::2]]
        convs.append({"messages": turns, "style": style})
    return _base(record, message_list=convs)


def points_example(record, rng, style: str | None = None) -> dict:
    """PixMo-Points: one message per expression, points float32[N, 2] (pixels, or 0-100 with point_scale);
    style None: each row's own "style" (the Molmo2 variants that train both styles)."""
    return _base(record, message_list=[
        {"label": r["label"], "points": points_xy(r["points"]), "style": style or r["style"],
         **({"point_scale": r["point_scale"]} if "point_scale" in r else {})} for r in record[2]])


def point_explanation_example(record, rng) -> dict:
    """`point_qa` answers whose `<|POINT|>` placeholders the formatter replaces with point tags."""
    return _base(record, message_list=[{
        "question": r["question"], "answer": r["parsed_response"], "style": "point_qa",
        "answer_annotations": [{"points": points_xy(p), "inline_text": i, "alt_text": a}
                               for p, i, a in zip(r["points"], r["inline_text"], r["alt_text"])]}
        for r in record[2]])


def count_example(record, rng, style: str | None = None) -> dict:
    """PixMo-Count: points (pixels) where published (train); validation/test carry the checked count
    (style None: the row's own "style", as for points_example)."""
    row = record[2][0]
    out = _base(record, label=row["label"], style=style or row["style"], metadata={"count": row["count"]})
    if row["points"]:
        out["points"] = points_xy(row["points"])
    return out


def points_eval_example(record, rng) -> dict:
    """PixMo-Points-Eval: metadata has the pixel points and SAM masks bool[N, H, W] (eval §B4)."""
    row = record[2][0]
    points = points_xy(row["points"])
    return _base(record, label=row["label"], points=points, style="pointing",
                 metadata={"points": points, "masks": np.asarray(row["masks"], bool)})


def docs_example(record, rng, style: str) -> dict:
    image, key, (row,) = record
    return {"image": image, "metadata": {"image_id": key},
            "message_list": [{"question": q, "answer": a, "style": style} for q, a in qa_pairs(row["questions"])]}


def qa_pairs(questions) -> list[tuple[str, str]]:
    """HF `Sequence({question, answer})` is stored as {question: [...], answer: [...]}; accept a list too."""
    if isinstance(questions, dict):
        return list(zip(questions["question"], questions["answer"]))
    return [(q["question"], q["answer"]) for q in questions]


def clock_example(record, rng) -> dict:
    """Style "clocks", the answer text, and metadata hour (0-11, 12 -> 0 as in the clock eval),
    minute, second (-1 when not shown) plus every published field. No image: the renderer adds it."""
    row = record[2][0]
    match = CLOCK_TIME.search(str(row["watch_time"])) or CLOCK_TIME.search(str(row["text"]))
    if match is None:
        raise ValueError(f"pixmo-clocks example {row['example_id']}: cannot read a time from "
                         f"watch_time={row['watch_time']!r} / text={row['text']!r}")
    hour, minute, second, _ = match.groups()
    seconds = int(second) if second is not None and row["shows_seconds"] else -1
    return {"style": "clocks", "question": "What time is being shown?", "answer": row["text"],
            "metadata": dict(row, hour=int(hour) % 12, minute=int(minute), second=seconds)}


# ---------------------------------------------------------------------------------------------------
# Registry: official dataset names (the spec §5.3 mixture entries).

@dataclasses.dataclass(frozen=True)
class Spec:
    folder: str  # HF repo folder under the data dir
    records: Callable  # (folder, split, image_dir, **record_args) -> (records, stats)
    example: Callable  # (record, rng, **example_args) -> example dict
    record_args: tuple = ()
    example_args: tuple = ()
    storage: str = ""  # prepared (ArrayRecord) config holding the records; "" = the source's own name


def _url_set(columns, optional=()):
    return functools.partial(url_records, columns=columns, optional=optional)


SOURCES = {
    "pixmo_cap": Spec("pixmo-cap", _url_set(["image_url", "caption", "transcripts"]), cap_example,
                      example_args=(("mode", "captions"),)),
    "pixmo_cap_with_transcripts": Spec("pixmo-cap", _url_set(["image_url", "caption", "transcripts"]), cap_example,
                                       example_args=(("mode", "transcript_and_caption"),), storage="pixmo_cap"),
    "pixmo_ask_model_anything": Spec("pixmo-ask-model-anything", _url_set(
        ["image_url", "image_sha256", "question", "answer"]), ask_model_anything_example),
    "pixmo_cap_qa": Spec("pixmo-cap-qa", _url_set(["image_url", "question", "answer"], ["messages"]), cap_qa_example),
    "pixmo_pointing_explanations": Spec("pixmo-point-explanations", point_explanation_records,
                                        point_explanation_example),
    "pixmo_points_eval": Spec("pixmo-points-eval", functools.partial(
        row_records, columns=["image_url", "image_sha256", "label", "points", "masks"]), points_eval_example),
    "pixmo_clocks": Spec("pixmo-clocks", clock_records, clock_example),
}
# The official style inversion: PixMoPoints(counting=True) trains "pointing", counting=False "point_count".
for _kind, _suffix in (("basic", ""), ("high_frequency", "_high_freq")):
    for _counting in (False, True):
        SOURCES[f"pixmo_points{_suffix}{'_counting' if _counting else ''}"] = Spec(
            "pixmo-points", points_records, points_example, (("kind", _kind),),
            (("style", "pointing" if _counting else "point_count"),), storage=f"pixmo_points{_suffix}")
for _counting in (False, True):  # PixMo-Count is not inverted
    SOURCES[f"pixmo_count{'_counting' if _counting else ''}"] = Spec(
        "pixmo-count", functools.partial(row_records, columns=["image_url", "image_sha256", "count", "points", "label"]),
        count_example, example_args=(("style", "point_count" if _counting else "pointing"),), storage="pixmo_count")
for _type in DOC_TYPES:
    SOURCES[f"pixmo_docs_{_type}"] = Spec("pixmo-docs", docs_records, docs_example, (("doc_type", _type),),
                                          (("style", f"pixmo_docs_{_type}"),))


def eval_image_urls(data_dir: str) -> list[str]:
    """Image URLs of PixMo-Points-Eval (held out of PixMo-Points training)."""
    folder = os.path.join(data_dir, "pixmo-points-eval")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is missing: PixMo-Points training holds out the pointing-eval images; "
                                "download allenai/pixmo-points-eval there (or pass exclude_urls=())")
    return read_parquet(folder, "test", ["image_url"]).column("image_url").to_pylist()


def spec(name: str) -> Spec:
    if name not in SOURCES:
        raise KeyError(f"unknown PixMo source {name!r}; known: {sorted(SOURCES)}")
    return SOURCES[name]


def load_records(name: str, data_dir: str, split: str, image_dir: str | None = None, **record_args):
    """(records, stats) of source `name` from `data_dir/<HF folder>`; `record_args` override e.g. n_val."""
    s = spec(name)
    args = dict(s.record_args)
    if s.records is points_records and "exclude_urls" not in record_args:
        args["exclude_urls"] = eval_image_urls(data_dir)
    return s.records(os.path.join(data_dir, s.folder), split, image_dir, **{**args, **record_args})


def load(name: str, data_dir: str, split: str, image_dir: str | None = None, **record_args) -> PixmoSource:
    """Source `name` (a key of SOURCES); image_dir (the download cache) for URL-based sets."""
    records, stats = load_records(name, data_dir, split, image_dir, **record_args)
    return PixmoSource(f"{name}[{split}]", records, example_fn(name), stats)


def example_fn(name: str, **example_args) -> Callable:
    """The picklable record -> example function of source `name`."""
    s = spec(name)
    return functools.partial(s.example, **{**dict(s.example_args), **example_args})
