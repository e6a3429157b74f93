"""`make demo` end to end in a reduced setting: a few training steps of a narrow model, two
held-out scenes per task, short answers. Checks every artefact the demo promises and that the
checkpoint is usable by the predict command."""
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from data_pipelines.pipeline import build_source

from molmo_jax.demo import data as demo_data
from molmo_jax.demo.__main__ import build_config, main, parse_args
from molmo_jax.demo.report import ROWS
from molmo_jax.inference.generate import GenerationConfig
from molmo_jax.inference.predictor import Predictor, Request

STEPS = 4
PER_TASK = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo") / "run"
    argv = ["--workdir", str(workdir), "--steps", str(STEPS), "--batch", "8", "--width", "32", "--layers", "1",
            "--eval-examples", str(PER_TASK), "--eval-batch", str(PER_TASK), "--max-new-tokens", "8",
            "--tokenizer-examples", "12", "--overlap-check", "8", "--config", "data.seq_len=128"]
    assert main(argv) == 0
    return workdir


def test_scores_before_and_after(run):
    scores = json.loads((run / "scores.json").read_text())
    keys = {key for key, *_ in ROWS}
    assert set(scores["before"]) == keys and set(scores["after"]) == keys
    for stage in ("before", "after"):
        assert all(np.isfinite(v) for v in scores[stage].values()), scores[stage]
        assert 0.0 <= scores[stage]["pointing_f1"] <= 1.0
    assert scores["steps"] == STEPS and scores["held_out_overlap"] == 0
    assert 0 < scores["cpu_seconds"] and 0 < scores["train_seconds"] < scores["total_seconds"]
    table = (run / "scores.md").read_text()
    assert all(title in table for _, title, *_ in ROWS) and "untrained" in table


def test_training_artefacts(run):
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert (run / "checkpoints" / str(STEPS) / "state").is_dir()
    assert (run / "tokenizer" / "spm.model").is_file()
    curve = Image.open(run / "loss_curve.png")
    assert curve.size[0] > 300 and curve.size[1] > 200


def test_answers_drawn(run):
    records = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert sorted({r["task"] for r in records}) == sorted(demo_data.TASKS)
    assert len(records) == len(demo_data.TASKS) * PER_TASK
    assert all(isinstance(r["prediction"], str) and "score" in r for r in records)
    pngs = sorted((run / "answers").glob("*.png"))
    assert [p.name for p in pngs] == sorted(f"{t}_{i}.png" for t in demo_data.TASKS for i in range(PER_TASK))
    image = np.asarray(Image.open(pngs[0]))
    assert image.shape[1] == 336 and image.shape[0] > 336  # the scene plus the answer text below it


def test_checkpoint_serves_predict(run):
    predictor = Predictor.from_checkpoint(str(run), tokenizer=str(run / "tokenizer" / "spm.model"), max_crops=1)
    assert predictor.crop.crop_size == predictor.model.config.vision.image_size[0]
    image = np.full((112, 112, 3), 200, np.uint8)
    [answer] = predictor.predict([Request("Point to the red circles", image, "pointing")],
                                 demo_generation_config())
    assert isinstance(answer.text, str)


def demo_generation_config():
    return GenerationConfig(max_new_tokens=4)


def test_bad_override_is_named():
    args = parse_args(["--config", "data.no_such_key=1"])
    with pytest.raises(KeyError, match="no_such_key"):
        build_config(args, "")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        build_config(parse_args(["--config", "data.seq_len"]), "")


def test_held_out_questions_keep_the_evaluation_absent_rate():
    """Training may oversample questions about absent shapes (configs/demo.py); the held-out
    questions ask for one at demo_data.EVAL_ABSENT_RATE whatever the training rate, with the same scenes."""
    config = build_config(parse_args([]), "")
    n = 300
    train_rate = config.data.synthetic_options.shapes.absent_rate
    assert train_rate > 0.3
    source = build_source("synthetic_counting", config.data, demo_data.EVAL_SEED)
    trained_absent = np.mean([source[i]["metadata"]["count"] == 0 for i in range(n)])
    sets = demo_data.held_out_sets(config, n)
    for task, key in (("counting", "gt_count"), ("pointing", "gt_points_px")):
        absent = np.mean([len(e["truth"][key]) == 0 if key == "gt_points_px" else e["truth"][key] == 0
                          for e in sets[task]])
        assert abs(absent - demo_data.EVAL_ABSENT_RATE) < 0.05, (task, absent)
    assert abs(trained_absent - train_rate) < 0.07
    config.data.synthetic_options.shapes.absent_rate = 0.0     # and the scenes do not depend on it
    again = demo_data.held_out_sets(config, 4)
    for a, b in zip(sets["counting"][:4], again["counting"]):
        np.testing.assert_array_equal(a["image"], b["image"])
