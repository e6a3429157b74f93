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
    assert "missing.jpg: unreadable file (No such file or directory)" in message and "13 problem(s)" in message


def test_check_command(folder, capsys):
    path = write_jsonl(folder / "data.jsonl", GOOD[:2] + [{"image": "imgs/cat.jpg"}])
    assert custom.main([path]) == 1
    out = capsys.readouterr().out
    assert f"{path}:3: -: no annotation" in out and "1 images, 2 annotations" in out


def broken_images(folder):
    """imgs/truncated.jpg: a good header, pixel data cut off; imgs/html.jpg: not an image."""
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), np.uint8)
    PIL.Image.fromarray(noise).save(folder / "imgs" / "full.jpg")
    data = (folder / "imgs" / "full.jpg").read_bytes()
    (folder / "imgs" / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (folder / "imgs" / "html.jpg").write_bytes(b"<html>404</html>")


def write_hostile(folder):
    broken_images(folder)
    lines = [
        json.dumps({"image": "imgs/cat.jpg", "caption": "ok"}).encode(),                       # 1 fine
        b'{"image": "imgs/cat.jpg", "caption": "caf\xe9 \xff"}',                             # 2
        b'{"image": "imgs/cat.jpg", "label": "ear", "points": [[' + b"9" * 400 + b', 2]]}',    # 3
        b'{"image": "imgs/cat.jpg", "caption": "x", "weight": ' + b"9" * 400 + b"}",           # 4
        b'{"image": "imgs/cat.jpg", "caption": "x", "id": ' + b"9" * 5000 + b"}",              # 5
        b'{"image": "imgs/cat.jpg", "caption": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",     # 6
        b'{"image": "imgs/cat.jpg", "caption": "x", "id": ' + b"[" * 70 + b"]" * 70 + b"}",    # 7
        json.dumps({"image": "imgs/cat.jpg", "label": "ear", "points": [[5000, 10]]}).encode(),  # 8
        json.dumps({"image": "imgs/cat.jpg", "label": "ear", "points": [[40, 30], [10, 31]]}).encode(),  # 9
        json.dumps({"image": "imgs/cat.jpg", "label": "ear", "points": [[-0.5, 101]],
                    "point_units": "percent"}).encode(),                                      # 10
        json.dumps({"image": "imgs/truncated.jpg", "caption": "x"}).encode(),                   # 11
        json.dumps({"image": "imgs/html.jpg", "caption": "x"}).encode(),                        # 12
        b'{"image": "imgs/\ud800.jpg", "caption": "x"}',                                      # 13
        json.dumps({"image": "imgs/dog.png", "label": "dog", "points": [[20, 20]]}).encode(),   # 14 fine
    ]
    path = folder / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_check_command_reports_hostile_lines_and_goes_on(folder, capsys):
    """Every problem is `file:line: field: reason`, the check goes on, exits 1 and counts."""
    path = write_hostile(folder)
    assert custom.main([path]) == 1
    out = capsys.readouterr().out
    expected = [
        "2: -: not UTF-8: byte 0xe9",
        "3: points[0]: expected [x, y] numbers, got [9999",
        "4: weight: expected a positive number, got 9999",
        "5: -: invalid JSON: Exceeds the limit (4300 digits)",
        "6: -: invalid JSON: nested deeper than 64 levels",
        "7: -: invalid JSON: nested deeper than 64 levels",
        "8: points[0]: [5000, 10] outside the 40x30 image",
        "9: points[1]: [10, 31] outside the 40x30 image",
        "10: points[0]: [-0.5, 101] outside 0..100 percent",
        "11: image: " + str(folder / "imgs" / "truncated.jpg") + ": truncated or corrupt data",
        "12: image: " + str(folder / "imgs" / "html.jpg") + ": not an image",
        "13: image: " + str(folder / "imgs") + "/\\ud800.jpg: unreadable file",
    ]
    for line in expected:
        assert f"{path}:{line}" in out, line
    assert out.count(f"{path}:") == len(expected) + 1  # one problem per bad line, then the summary
    assert (f"{path}: 14 lines, 2 accepted, 12 rejected; 2 images, 2 annotations "
            "{'long_caption': 1, 'pointing': 1}; 12 problem(s)") in out


def test_training_source_refuses_hostile_file_at_start(folder):
    """CustomSource lists the same problems before any example is read; it reads image headers
    only, so the truncated pixel data of line 11 is left to the pipeline (skipped, counted)."""
    with pytest.raises(custom.CustomDataError) as info:
        custom.CustomSource(write_hostile(folder))
    assert sorted({e.line for e in info.value.errors}) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13]


def test_check_command_as_a_process_prints_no_traceback(folder):
    import subprocess
    import sys
    path = write_hostile(folder)
    done = subprocess.run([sys.executable, "-m", "data_pipelines.sources.custom", path, str(folder / "none.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr + done.stdout, done.stderr
    assert f"{folder / 'none.jsonl'}:0: -: cannot read: No such file or directory" in done.stdout


def test_check_command_whole_file_problems(folder, capsys):
    """Missing, a folder, empty, blank lines only, a broken parquet: line 0, exit 1, next file checked."""
    (folder / "empty.jsonl").write_bytes(b"")
    (folder / "blank.jsonl").write_bytes(b"\n  \n\t\n")
    (folder / "broken.parquet").write_bytes(b"PAR1 not really")
    good = write_jsonl(folder / "good.jsonl", GOOD[:1])
    paths = [str(folder / n) for n in ("missing.jsonl", "imgs", "empty.jsonl", "blank.jsonl", "broken.parquet")]
    assert custom.main(paths + [good]) == 1
    out = capsys.readouterr().out
    assert f"{paths[0]}:0: -: cannot read: No such file or directory" in out
    assert f"{paths[1]}:0: -: cannot read: Is a directory" in out
    assert f"{paths[2]}:0: -: no examples: the file is empty" in out
    assert f"{paths[3]}:0: -: no examples: the file is empty" in out
    assert f"{paths[4]}:0: -: cannot read as parquet:" in out
    assert f"{good}: 1 lines, 1 accepted, 0 rejected; 1 images, 1 annotations" in out and f"{good}:0" not in out
    assert custom.main([good]) == 0
    with pytest.raises(custom.CustomDataError, match="empty.jsonl:0: -: no examples"):
        custom.CustomSource(paths[2])


def test_check_command_parquet_rows(folder, capsys):
    broken_images(folder)
    rows = [{"image": "imgs/cat.jpg", "label": "ear", "points": [[5000.0, 10.0]], "caption": None},
            {"image": "imgs/truncated.jpg", "label": None, "points": None, "caption": "x"},
            {"image": "imgs/dog.png", "label": "dog", "points": [[1.0, 2.0]], "caption": None}]
    path = folder / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert custom.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:1: points[0]: [5000.0, 10.0] outside the 40x30 image" in out
    assert f"{path}:2: image: {folder / 'imgs' / 'truncated.jpg'}: truncated or corrupt data" in out
    assert f"{path}: 3 lines, 1 accepted, 2 rejected" in out


def test_custom_file_feeds_the_training_pipeline(folder, golden_dir):
    """`--config.data.mixture=custom --config.data.custom=FILE` (docs/custom_data.md) gives batches."""
    import ml_collections

    from data_pipelines import pipeline
    from data_pipelines.tokenizer import load_tokenizer

    # A good header over broken pixel data passes the start-up check; the pipeline skips it, counted.
    broken_images(folder)
    path = write_jsonl(folder / "data.jsonl", GOOD + [{"image": "imgs/truncated.jpg", "caption": "x"}])
    config = ml_collections.ConfigDict(dict(
        stage="sft",
        model=dict(vision=dict(image_size=(112, 112), patch_size=14), connector=dict(pool_h=2),
                   llm=dict(vocab_size=152064)),
        train=dict(global_batch=2),
        data=dict(mixture="custom", custom=path, tokenizer="", seq_len=512, max_crops=2, seed=0, num_workers=0,
                  overlap_margins=(2, 2), prefetch=1)))
    it = iter(pipeline.make_pipeline(config, tokenizer=load_tokenizer(golden_dir / "molmo-7b-d-hf")))
    try:
        batches = [next(it) for _ in range(3)]
    finally:
        it.close()
    for batch in batches:
        assert batch["input_ids"].shape == (2, 512)
        assert (batch["loss_masks"] > 0).any()
        # every example has an image: crop 0 (the global crop) is real in both rows
        assert (batch["images"][:, 0] != -1).any(axis=(-1, -2)).all()
    assert it.stats.skipped["corrupt_image"] >= 1 and it.stats.examples == 6

    config.data.custom = ""
    with pytest.raises(ValueError, match="config.data.custom"):
        pipeline.make_pipeline(config, tokenizer=load_tokenizer(golden_dir / "molmo-7b-d-hf"))
