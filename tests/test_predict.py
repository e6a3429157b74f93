"""The predict command on the golden tiny model: HF folder and orbax checkpoint loading, single and
JSONL batch requests, and points drawn on the image."""
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from molmo_jax import predict as predict_cli
from molmo_jax.inference.drawing import PointGroup, draw_points, find_points
from molmo_jax.inference.generate import GenerationConfig
from molmo_jax.inference.predictor import (Predictor, Request, collate, crop_bucket, with_compute_dtype,
                                         load_orbax_model)

MAX_NEW = 5


def train_tiny_tokenizer(folder, user_symbols=()):
    """A small sentencepiece model (ids < 512, EOS = 1 like the golden tiny models); each of
    `user_symbols` becomes one token."""
    import sentencepiece
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(["User: point to the cat Assistant:", "how many dogs are there",
                                 "User: chart_qa: what is in the image Assistant:", "vqa2: a_okvqa_mc: pointing:",
                                 "a red circle and a blue square", "the clock shows ten past three"] * 40))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=120, model_type="bpe", character_coverage=1.0,
        bos_id=-1, eos_id=1, unk_id=0, pad_id=-1, minloglevel=2, user_defined_symbols=list(user_symbols))
    corpus.unlink()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, golden_dir):
    """An HF-layout folder: the golden qwen2_style weights + a tiny tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_hf")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(golden_dir / "model" / "qwen2_style" / name, folder / name)
    train_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor.from_checkpoint(str(checkpoint), max_crops=2)


@pytest.fixture(scope="module")
def image_path(golden_dir):
    return golden_dir / "preprocess" / "astronaut_face_100x100.png"


def test_single_request_cli(predictor, checkpoint, image_path, capsys):
    [expected] = predictor.predict([Request("what is in the image", str(image_path))],
                                   GenerationConfig(max_new_tokens=MAX_NEW))
    assert len(expected.tokens) >= 1
    predict_cli.main(["--checkpoint", str(checkpoint), "--image", str(image_path), "--prompt",
                      "what is in the image", "--max-new-tokens", str(MAX_NEW), "--max-crops", "2"])
    assert capsys.readouterr().out.splitlines()[0] == expected.text


def test_batch_equals_single_requests(predictor, checkpoint, image_path, tmp_path):
    requests = [Request("what is in the image", str(image_path)), Request("how many dogs are there"),
                Request("point to the cat", image_path.read_bytes(), style="pointing")]
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    batched = predictor.predict(requests, config, batch_size=3)
    for request, answer in zip(requests, batched):
        [alone] = predictor.predict([request], config)
        np.testing.assert_array_equal(alone.tokens, answer.tokens)
        assert alone.text == answer.text

    lines = [{"id": "a", "image": str(image_path), "prompt": "what is in the image"},
             {"prompt": "how many dogs are there"}]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    predict_cli.main(["--checkpoint", str(checkpoint), "--requests", str(tmp_path / "requests.jsonl"),
                      "--out", str(tmp_path / "answers.jsonl"), "--max-new-tokens", str(MAX_NEW),
                      "--max-crops", "2"])
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == [batched[0].text, batched[1].text]
    assert rows[0]["id"] == "a" and rows[1]["points"] == []


def test_padded_last_batch_and_bfloat16(predictor, checkpoint):
    requests = [Request("how many dogs are there"), Request("point to the cat")]
    config = GenerationConfig(max_new_tokens=2)
    padded = predictor.generate_batch([predictor.prepare(r) for r in requests[:1]], config, batch_size=2)
    [alone] = predictor.predict(requests[:1], config)
    assert len(padded) == 1 and np.array_equal(padded[0].tokens, alone.tokens)

    bf16 = Predictor.from_checkpoint(str(checkpoint), dtype="bfloat16")
    assert bf16.model.config.dtype == "bfloat16"
    assert len(bf16.predict(requests[:1], config)) == 1
    converted = with_compute_dtype(predictor.model, "bfloat16")
    assert converted.config.dtype == "bfloat16"
    for a, b in zip(jax.tree.leaves(nnx.state(converted)), jax.tree.leaves(nnx.state(predictor.model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # params stay float32


def test_collate_pads_prompts_and_crops(predictor, image_path):
    a = predictor.prepare(Request("what is in the image", str(image_path)))
    b = predictor.prepare(Request("how many dogs are there"))
    batch = collate([a, b])
    assert batch["input_ids"].shape == (2, len(a["input_tokens"]))
    assert (batch["input_ids"][1, len(b["input_tokens"]):] == -1).all()
    assert batch["images"].shape[:2] == (2, a["images"].shape[0])
    assert (batch["images"][1] == -1).all() and (batch["image_input_idx"][1] == -1).all()
    assert [crop_bucket(c, 12) for c in (1, 2, 3, 5, 8, 9, 13)] == [1, 2, 4, 8, 8, 13, 13]
    assert collate([a, b], max_crops=12)["images"].shape[1] == crop_bucket(a["images"].shape[0], 12)


def test_prompt_formats(predictor, checkpoint):
    """Chat prompts as the HF processor builds them; stage-1 captioners get " long_caption 65:"."""
    from data_pipelines import formatting
    decode = predictor.tokenizer.decode
    chat = predictor.prepare(Request("point to the cat"))["input_tokens"]
    assert chat[0] == predictor.tokenizer.bos_id and decode(chat).strip() == "User: point to the cat Assistant:"
    captioner = Predictor(predictor.model, predictor.tokenizer, predictor.crop, formatting.CAPTIONER)
    tokens = captioner.prepare(Request("", style="long_caption"))["input_tokens"]
    assert "User" not in decode(tokens) and decode(tokens).strip().startswith("long")


def test_find_and_draw_points():
    answer = ('<points x1="10.0" y1="20.0" x2="90.0" y2="80.0" alt="two cats">two cats</points> and '
              '<point x="50.0" y="50.0" alt="dog">dog</point>')
    groups = find_points(answer)
    assert groups == [PointGroup("two cats", [(10.0, 20.0), (90.0, 80.0)]), PointGroup("dog", [(50.0, 50.0)])]
    assert find_points("(25.0, 75.0)") == [PointGroup("", [(25.0, 75.0)])]
    assert find_points("no points here") == []
    drawn = np.asarray(draw_points(Image.new("RGB", (200, 100), "black"), groups, radius=4))
    for x, y in [(20, 20), (180, 80), (100, 50)]:
        assert drawn[y, x].any(), (x, y)  # a dot is drawn at each point
    assert not drawn[5, 100].any()


def test_orbax_checkpoint(predictor, tmp_path):
    """A training checkpoint (trainable and frozen params stored apart) loads into the same model."""
    from molmo_jax.train.checkpointing import Checkpointer
    from molmo_jax.train.optimizer import split_trainable
    params = nnx.to_pure_dict(nnx.state(predictor.model))
    trainable, frozen = split_trainable(params, "vision/.*")
    state = {"params": trainable, "frozen": frozen, "opt_state": {"mu": trainable},
             "step": jax.numpy.int32(3), "rng": jax.random.key_data(jax.random.key(0))}
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    checkpointer.save(3, state, None, {"step": 3, "model": predictor.model.config.to_dict()})
    checkpointer.close()
    loaded = load_orbax_model(str(tmp_path))
    for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(predictor.model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="neither an HF Molmo folder"):
        load_orbax_model(str(tmp_path / "nothing"))


def test_image_from_url(image_path):
    """--image accepts http(s) URLs (served here from 127.0.0.1)."""
    import functools
    import http.server
    import threading
    from molmo_jax.inference.predictor import read_image_source
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(image_path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{image_path.name}"
        assert read_image_source(url) == image_path.read_bytes()
        assert read_image_source(str(image_path)) == str(image_path)
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- hostile inputs (issue: nothing hangs)
from test_download import server  # noqa: E402,F401  (the hostile HTTP server on 127.0.0.1)


def test_image_url_deadline_and_size_cap_bound_the_whole_download(server):
    """A server that drips its headers is cut off at the deadline; a body over the cap is refused
    once the cap is passed, not read to its end; a non-image body from its first bytes."""
    import dataclasses
    import time
    from molmo_jax.inference.predictor import IMAGE_FETCH, RequestError, read_image_source
    config = dataclasses.replace(IMAGE_FETCH, deadline=2.0, read_timeout=1.0, max_bytes=2**20, max_attempts=1)
    start = time.monotonic()
    with pytest.raises(RequestError, match="drip-headers: timeout"):
        read_image_source(f"{server}/drip-headers", config)
    assert time.monotonic() - start < 2.0 + 3.0  # the drip would go on for 30 s
    with pytest.raises(RequestError, match="big-chunked: too_large"):
        read_image_source(f"{server}/big-chunked", config)
    with pytest.raises(RequestError, match="html: html"):
        read_image_source(f"{server}/html", config)
    assert read_image_source(f"{server}/good/0", config)[:4] == b"\x89PNG"


def test_bad_requests_get_error_lines_and_the_others_are_answered(checkpoint, image_path, server, tmp_path,
                                                                   capsys):
    """One bad line, a missing prompt, a dead URL, a hostile URL and a file that is no image each
    yield an error record; the good requests are answered as alone; exit status 1, no traceback."""
    closed = socket_free_port()
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text")
    lines = [json.dumps({"id": "a", "prompt": "what is in the image", "image": str(image_path)}),
             "{not json",
             json.dumps({"id": "b", "image": str(image_path)}),
             json.dumps({"id": "c", "prompt": "what is in the image", "image": f"http://127.0.0.1:{closed}/x.png"}),
             json.dumps({"id": "d", "prompt": "what is in the image", "image": f"{server}/html"}),
             json.dumps({"id": "e", "prompt": "what is in the image", "image": str(not_image)}),
             json.dumps({"id": "f", "prompt": "how many dogs are there"})]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers.jsonl"
    status = predict_cli.main(["--checkpoint", str(checkpoint), "--requests", str(requests), "--out", str(out),
                               "--max-new-tokens", str(MAX_NEW), "--max-crops", "2", "--timeout", "5"])
    assert status == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(lines)
    errors = {row.get("id", row.get("line")): row["error"] for row in rows if "error" in row}
    assert set(errors) == {2, "b", "c", "d", "e"}, errors
    assert "not valid JSON" in errors[2] or "JSON" in errors[2]
    assert "prompt: missing" in errors["b"]
    assert "connection_refused" in errors["c"] and "html" in errors["d"] and "not an image" in errors["e"]
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 5 and "5 of 7 requests not answered" in err
    alone = Predictor.from_checkpoint(str(checkpoint), max_crops=2).predict(
        [Request("what is in the image", str(image_path)), Request("how many dogs are there")],
        GenerationConfig(max_new_tokens=MAX_NEW))
    assert [r["answer"] for r in rows if "answer" in r] == [a.text for a in alone]


def test_single_request_errors_are_one_line(checkpoint, tmp_path):
    import subprocess
    import sys
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)  # a JPEG header and nothing else
    p = subprocess.run([sys.executable, "-m", "molmo_jax.predict", "--checkpoint", str(checkpoint), "--image",
                        str(bad), "--prompt", "what", "--max-crops", "2"], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith("error: image ")
    p = subprocess.run([sys.executable, "-m", "molmo_jax.predict", "--checkpoint", str(tmp_path / "nothing"),
                        "--prompt", "what"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "error: " in p.stderr, p.stderr[-2000:]


def socket_free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
