"""Custom data: every annotation kind read into the official example shape; bad lines reported."""
import json

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines import formatting
from data_pipelines.sources import custom


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name, size in (("cat.jpg", (40, 30)), ("dog.png", (20, 20))):
        PIL.Image.new("RGB", size, (90, 60, 30)).save(tmp_path / "imgs" / name)
    return tmp_path


def write_jsonl(path, objs):
    path.write_text("\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n")
    return str(path)


GOOD = [
    {"image": "imgs/cat.jpg", "caption": "A tabby cat.", "id": "c1"},
    {"image": "imgs/cat.jpg", "question": "What color?", "answer": "Brown."},
    {"image": "imgs/cat.jpg", "question": "Which animal?", "options": ["dog", "cat"], "answer_idx": 1},
    {"image": "imgs/cat.jpg", "label": "ear", "points": [[10, 5], [30, 6]]},
    {"image": "imgs/dog.png", "label": "Dog", "points": [[50.0, 25.0]], "point_units": "percent",
     "style": "point_count", "weight": 2.0},
    {"image": "imgs/dog.png", "messages": ["Is it a dog?", "Yes.", "Color?", "Brown."], "weight": 2.0},
    {"image": "imgs/dog.png", "weight": 2.0, "annotations": [
        {"caption": "A brown dog.", "style": "short_caption"}, {"label": "cat", "points": []}]},
]


def test_every_kind_grouped_per_image(folder):
    source = custom.CustomSource(write_jsonl(folder / "data.jsonl", GOOD))
    assert len(source) == 2
    cat, dog = source[0], source[1]
    assert cat["image"] == str(folder / "imgs" / "cat.jpg") and cat["metadata"] == {"lines": [1, 2, 3, 4],
                                                                                   "ids": ["c1"]}
    msgs = cat["message_list"]
    assert msgs[0] == {"style": "long_caption", "text": "A tabby cat."}
    assert msgs[1] == {"style": "user_qa", "question": "What color?", "answer": "Brown."}
    assert msgs[2] == {"style": "a_okvqa_mc", "question": "Which animal?", "options": ["dog", "cat"], "answer_idx": 1}
    assert msgs[3]["style"] == "pointing" and "point_scale" not in msgs[3]
    np.testing.assert_array_equal(msgs[3]["points"], [[10, 5], [30, 6]])
    assert dog["weight"] == 2.0 and [m["style"] for m in dog["message_list"]] == [
        "point_count", "user_qa", "short_caption", "pointing"]
    assert dog["message_list"][0]["point_scale"] == 100

    # The formatter reads them: pixel points over the 40x30 image become percent, percent stays.
    convs, _ = formatting.format_example(cat, image_hw=(30, 40))
    assert convs[3][1] == ' <points x1="25.0" y1="16.7" x2="75.0" y2="20.0" alt="ear">ear</points>'
    assert convs[2][0].endswith("Which animal?\nA: dog\nB: cat\n Assistant:") and convs[2][1] == " B"
    convs, _ = formatting.format_example(dog, image_hw=(20, 20))
    assert convs[0][1] == ' Counting the <point x="50.0" y="25.0" alt="dog">dog</point> shows a total of 1.'
    assert convs[3][1] == " There are none."


def test_parquet_same_format(folder):
    rows = [{"image": "imgs/cat.jpg", "question": "Q?", "answer": "A.", "caption": None},
            {"image": "imgs/dog.png", "question": None, "answer": None, "caption": "A dog."}]
    pq.write_table(pa.Table.from_pylist(rows), folder / "data.parquet")
    source = custom.CustomSource(str(folder / "data.parquet"))
    assert [ex["message_list"][0]["style"] for ex in source] == ["user_qa", "long_caption"]


def test_bad_lines_reported_with_line_field_problem(folder):
    bad = [
        {"image": "imgs/cat.jpg", "caption": "ok"},                                     # 1 fine
        '{"image": "imgs/cat.jpg", "caption": "unterminated',                            # 2
        {"image": "imgs/missing.jpg", "caption": "x"},                                  # 3
        {"image": "imgs/cat.jpg"},                                                      # 4
        {"image": "imgs/cat.jpg", "caption": "x", "question": "q", "answer": "a"},      # 5
        {"image": "imgs/cat.jpg", "label": "ear", "points": [[1, 2], [3]]},             # 6
        {"image": "imgs/cat.jpg", "label": "ear", "points": [[101, 2]], "point_units": "percent"},  # 7
        {"image": "imgs/cat.jpg", "question": "q", "options": ["a", "b"], "answer_idx": 2},        # 8
        {"image": "imgs/cat.jpg", "messages": ["only a question"]},                     # 9
        {"image": "imgs/cat.jpg", "caption": "x", "colour": "red"},                     # 10
        {"image": "imgs/cat.jpg", "annotations": [{"caption": "x"}, {"question": "q"}]},  # 11
        {"image": "imgs/cat.jpg", "caption": "x", "weight": -1},                        # 12
        {"image": "imgs/cat.jpg", "caption": "x", "weight": 3.0},                       # 13
        '[1, 2]',                                                                       # 14
    ]
    path = write_jsonl(folder / "bad.jsonl", bad)
    with pytest.raises(custom.CustomDataError) as info:
        custom.CustomSource(path)
    found = {(e.line, e.field) for e in info.value.errors}
    assert found == {(2, "-"), (3, "image"), (4, "-"), (5, "-"), (6, "points[1]"), (7, "points[0]"),
                     (8, "answer_idx"), (9, "messages"), (10, "colour"), (11, "annotations[1].answer"),
                     (12, "weight"), (13, "weight"), (14, "-")}
    message = str(info.value)
    assert "bad.jsonl:6: points[1]: expected [x, y] numbers, got [3]" in message
    assert "bad.jsonl:3: image: file not found" in message and "13 problem(s)" in message


def test_check_command(folder, capsys):
    path = write_jsonl(folder / "data.jsonl", GOOD[:2] + [{"image": "imgs/cat.jpg"}])
    assert custom.main([path]) == 1
    out = capsys.readouterr().out
    assert f"{path}:3: -: no annotation" in out and "1 images, 2 annotations" in out


def test_custom_file_feeds_the_training_pipeline(folder, golden_dir):
    """`--config.data.mixture=custom --config.data.custom=FILE` (docs/custom_data.md) gives batches."""
    import ml_collections

    from data_pipelines import pipeline
    from data_pipelines.tokenizer import load_tokenizer

    path = write_jsonl(folder / "data.jsonl", GOOD)
    config = ml_collections.ConfigDict(dict(
        stage="sft",
        model=dict(vision=dict(image_size=(112, 112), patch_size=14), connector=dict(pool_h=2),
                   llm=dict(vocab_size=152064)),
        train=dict(global_batch=2),
        data=dict(mixture="custom", custom=path, tokenizer="", seq_len=512, max_crops=2, seed=0, num_workers=0,
                  overlap_margins=(2, 2), prefetch=1)))
    it = iter(pipeline.make_pipeline(config, tokenizer=load_tokenizer(golden_dir / "molmo-7b-d-hf")))
    try:
        batch = next(it)
    finally:
        it.close()
    assert batch["input_ids"].shape == (2, 512)
    assert (batch["loss_masks"] > 0).any()
    # every example has an image: crop 0 (the global crop) is real in both rows
    assert (batch["images"][:, 0] != -1).any(axis=(-1, -2)).all()

    config.data.custom = ""
    with pytest.raises(ValueError, match="config.data.custom"):
        pipeline.make_pipeline(config, tokenizer=load_tokenizer(golden_dir / "molmo-7b-d-hf"))
