"""Molmo2 predict: a tiny random transformers Molmo2 folder (config.json + safetensors +
tokenizer.json + processor_config.json) answers through Molmo2Predictor and the CLI, on an image
and on a video the test encodes; bad inputs are one error line; points drawn on video frames."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from PIL import Image
from flax import nnx
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from molmo_jax import export as export_cli, predict
from molmo_jax.convert import hf_molmo
from molmo_jax.inference import drawing
from molmo_jax.inference.generate import GenerationConfig
from molmo_jax.inference.generate_molmo2 import Molmo2Generator
from molmo_jax.inference import predictor_molmo2
from molmo_jax.inference.predictor_molmo2 import Molmo2Answer, Molmo2Predictor
from molmo_jax.model import lora, molmo2_config as m2
from molmo_jax.tools import logits as logits_tool
from molmo_jax.train import export_verify, hf_interop
from molmo_jax.train.checkpointing import Checkpointer
from test_molmo2_model import CASES, our_forward, random_hf_model
from test_molmo2_preprocess import write_video

# Molmo2's tokens at the tiny preset's ids (500..507, then the placeholders and EOS in the
# 12 extra embedding rows).
SPECIAL = ["<im_start>", "<im_end>", "<im_patch>", "<low_res_im_start>", "<frame_start>", "<frame_end>",
           "<im_col>", "<im_low>", "<|image|>", "<|video|>", "<|endoftext|>"]
EOS = 510
STEPS = 4


def write_tokenizer(folder, base_size=500):
    """A byte-level BPE of exactly `base_size` pieces (bytes + unused fillers) + SPECIAL after it."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {piece: i for i, piece in enumerate(alphabet)}
    vocab.update({f"fill{i}": i for i in range(len(vocab), base_size)})
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    assert tok.token_to_id("<im_start>") == 500 and tok.token_to_id("<|endoftext|>") == EOS
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": None}))


PROCESSOR = {
    "processor_class": "Molmo2Processor", "image_use_col_tokens": True, "use_single_crop_start_token": True,
    "video_use_col_tokens": False, "use_frame_special_tokens": True,
    "image_processor": {"max_crops": 2, "overlap_margins": [1, 1], "pooling_size": [2, 2], "patch_size": 4,
                        "size": {"height": 24, "width": 24}},
    "video_processor": {"pooling_size": [3, 3], "overlap_margins": [1, 1], "num_frames": 4, "max_fps": 2, "patch_size": 4,
                        "frame_sample_mode": "uniform_last_frame", "sampling_fps": 2,
                        "size": {"height": 24, "width": 24}}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(transformers' model, the folder it was saved to with a tokenizer and processor config)."""
    folder = tmp_path_factory.mktemp("molmo2_ckpt")
    hf = random_hf_model(m2.get_preset("tiny-molmo2-qwen3"), seed=2)
    hf.save_pretrained(folder)
    write_tokenizer(folder)
    (folder / "processor_config.json").write_text(json.dumps(PROCESSOR))
    return hf, folder


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint[1]


@pytest.fixture(scope="module")
def predictor(folder):
    return Molmo2Predictor.from_checkpoint(str(folder))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), np.uint8)
    Image.fromarray(image).save(root / "cat.png")
    write_video(root / "clip.mp4", n_frames=30, fps=10)
    (root / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    return root


def test_predictor_tokens_equal_the_generator(predictor, media):
    inputs = predictor.prepare("Describe this image.", images=[str(media / "cat.png")])
    assert (inputs["input_ids"] == 502).sum() == len(inputs["image_token_pooling"])  # <im_patch> per pooled token
    answer = predictor.generate(inputs, GenerationConfig(max_new_tokens=STEPS))
    batch = {"input_ids": inputs["input_ids"].astype(np.int32), "pixel_values": inputs["pixel_values"],
             "token_pooling": inputs["image_token_pooling"], "mm_token_type_ids": inputs["mm_token_type_ids"]}
    out = Molmo2Generator(predictor.model)(batch, GenerationConfig(max_new_tokens=STEPS, stop_token_ids=(EOS,)))
    expected = out.tokens[0][out.tokens[0] >= 0]
    assert len(expected) > 0 and answer.tokens.tolist() == expected.tolist()
    assert answer.text == predictor.tokenizer.decode(expected.tolist()).strip()
    assert predictor.stop_token_ids == (EOS,)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_predictor_tokens_equal_transformers_generate(checkpoint, predictor, media, kind):
    """End to end: our processor's arrays fed to transformers' greedy generate give our tokens."""
    hf, _ = checkpoint
    media_kw = {"images": [str(media / "cat.png")]} if kind == "image" else {"video": str(media / "clip.mp4")}
    inputs = predictor.prepare("Describe it.", **media_kw)
    steps = 2 * STEPS
    ours = predictor.generate(inputs, GenerationConfig(max_new_tokens=steps, stop_token_ids=(-2,)))
    kw = {k: torch.as_tensor(v) for k, v in inputs.items() if k not in ("frame_indices", "timestamps")}
    kw["attention_mask"] = torch.ones_like(kw["input_ids"])
    with torch.no_grad():
        out = hf.generate(**kw, max_new_tokens=steps, do_sample=False, eos_token_id=None)
    assert ours.tokens.tolist() == out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(set(ours.tokens.tolist())) > 2  # random weights, yet not one repeated token


def test_cli_answers_on_an_image(folder, media, capsys):
    assert predict.main(["--checkpoint", str(folder), "--image", str(media / "cat.png"), "--prompt", "What is it?",
                         "--max-new-tokens", str(STEPS)]) == 0
    assert capsys.readouterr().out.strip()


def test_cli_answers_on_a_video(folder, media, capsys):
    assert predict.main(["--checkpoint", str(folder), "--video", str(media / "clip.mp4"), "--prompt",
                         "What happens?", "--max-new-tokens", str(STEPS)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # 3 s at 10 fps, 4 frames at most: spread evenly from the first to the last frame.
    assert lines[-1] == "frames: 0@0.00s 9@0.90s 19@1.90s 29@2.90s"


def test_bad_video_is_one_error_line(folder, media):
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", str(folder), "--video", str(media / "bad.mp4"), "--prompt", "What?"])
    message = str(e.value.code)
    assert message.startswith("error: ") and "bad.mp4" in message and "\n" not in message


def test_missing_processor_config_is_one_error_line(folder, media, tmp_path):
    for name in os.listdir(folder):
        if name != "processor_config.json":
            os.symlink(folder / name, tmp_path / name)
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", str(tmp_path), "--image", str(media / "cat.png"), "--prompt", "What?"])
    assert str(e.value.code) == f"error: {tmp_path}: no processor_config.json (not a Molmo2 processor folder)"


def test_video_without_a_molmo2_checkpoint_is_refused(media, tmp_path):
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", str(tmp_path), "--video", str(media / "clip.mp4"), "--prompt", "What?"])
    assert "--video needs a Molmo2 checkpoint (a folder" in str(e.value.code)


def write_training_checkpoint(folder, directory, **meta):
    """The folder's weights saved as the trainer saves a Molmo2 run's step (state params + meta),
    the folder as its processor and tokenizer (unless `meta` overrides them)."""
    config, state = hf_molmo.load_hf_checkpoint(str(folder))
    params = jax.tree.map(jnp.asarray, nnx.to_pure_dict(state))
    saver = Checkpointer(str(directory), async_save=False)
    saver.save(5, {"params": params}, None, {"step": 5, "model_family": "molmo2", "model": config.to_dict(),
                                             "tokenizer": str(folder), "processor": str(folder), **meta})
    saver.close()
    return directory


@pytest.fixture(scope="module")
def training_checkpoint(folder, tmp_path_factory):
    return write_training_checkpoint(folder, tmp_path_factory.mktemp("molmo2_run") / "checkpoints")


@pytest.mark.parametrize("kind", ["image", "video"])
def test_a_training_checkpoint_answers_as_its_folder_does(predictor, training_checkpoint, media, kind):
    """predict straight from a Molmo2 run's checkpoint (no export): the processor, tokenizer, chat
    template and EOS ids its meta leads to, and the same greedy tokens as the folder."""
    run = Molmo2Predictor.from_checkpoint(str(training_checkpoint))
    assert run.processor == predictor.processor and run.stop_token_ids == predictor.stop_token_ids
    assert run.chat_template == predictor.chat_template
    media_kw = {"images": [str(media / "cat.png")]} if kind == "image" else {"video": str(media / "clip.mp4")}
    config = GenerationConfig(max_new_tokens=2 * STEPS, stop_token_ids=(-2,))
    ours = run.predict("Describe it.", config=config, **media_kw)
    assert ours.tokens.tolist() == predictor.predict("Describe it.", config=config, **media_kw).tokens.tolist()
    assert len(set(ours.tokens.tolist())) > 2


def test_cli_and_logits_tool_take_a_molmo2_training_checkpoint(folder, training_checkpoint, media, tmp_path, capsys):
    args = ["--video", str(media / "clip.mp4"), "--prompt", "What happens?", "--max-new-tokens", str(STEPS)]
    assert predict.main(["--checkpoint", str(folder)] + args) == 0
    expected = capsys.readouterr().out
    assert predict.main(["--checkpoint", str(training_checkpoint.parent)] + args) == 0  # the run dir
    assert capsys.readouterr().out == expected
    inputs = CASES["multi_image"](m2.get_preset("tiny-molmo2-qwen3"))
    np.savez(tmp_path / "inputs.npz", **inputs)
    for name, checkpoint in (("folder", folder), ("run", training_checkpoint)):
        assert logits_tool.main(["--checkpoint", str(checkpoint), "--inputs", str(tmp_path / "inputs.npz"),
                                 "--out", str(tmp_path / f"{name}.npz")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "run.npz")["logits"], np.load(tmp_path / "folder.npz")["logits"])


def test_a_training_checkpoint_without_tokenizer_or_processor_is_one_error_line(folder, media, tmp_path):
    for name, meta, message in (("no_tok", {"tokenizer": ""}, "the checkpoint records no tokenizer"),
                                ("no_proc", {"processor": str(tmp_path)}, "the recorded processor: ")):
        run = write_training_checkpoint(folder, tmp_path / name, **meta)
        with pytest.raises(SystemExit) as e:
            predict.main(["--checkpoint", str(run), "--image", str(media / "cat.png"), "--prompt", "What?"])
        assert str(e.value.code).startswith(f"error: {run}/5: ") and message in str(e.value.code), e.value.code
        assert "\n" not in str(e.value.code)
    # --tokenizer stands in for the one the checkpoint does not record.
    assert predict.main(["--checkpoint", str(tmp_path / "no_tok"), "--tokenizer", str(folder), "--image",
                         str(media / "cat.png"), "--prompt", "What?", "--max-new-tokens", "2"]) == 0


def test_the_molmo_predictor_refuses_a_molmo2_checkpoint_by_name(folder, training_checkpoint):
    """The v1 Predictor (behind the server) names a Molmo2 folder or run instead of failing inside."""
    from molmo_jax.inference.predictor import Predictor
    for path in (folder, training_checkpoint):
        with pytest.raises(ValueError, match="holds a Molmo2 model, which this .Molmo. predictor does not run"):
            Predictor.from_checkpoint(str(path))


def test_export_verify_of_a_molmo2_run_checks_both_readers_and_catches_a_corrupted_tensor(training_checkpoint,
                                                                                          tmp_path, capsys):
    """export --verify on a Molmo2 run: the folder read back by our reader gives the checkpoint's
    logits exactly and transformers' Molmo2 within its tolerance, on a processor-made image input;
    one tensor changed in the folder fails the check, naming it."""
    out = tmp_path / "hf"
    export_cli.main(["--checkpoint", str(training_checkpoint), "--out", str(out), "--verify"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "verify (project): max |logits difference| 0", lines
    torch_diff = float(lines[1].rsplit(" ", 1)[1])
    assert lines[1].startswith("verify (torch): max |logits difference| ") and torch_diff < 1e-4, lines
    assert lines[-1] == str(out)
    [shard] = [n for n in os.listdir(out) if n.endswith(".safetensors")]
    tensors = safetensors.numpy.load_file(str(out / shard))
    key = next(k for k in tensors if "lm_head" in k)
    tensors[key] = tensors[key] + 0.5
    safetensors.numpy.save_file(tensors, str(out / shard), metadata={"format": "pt"})
    params = hf_interop.CheckpointParams(str(training_checkpoint))
    try:
        with pytest.raises(hf_interop.ExportError, match=r"--verify: .* does not reproduce the checkpoint: project max"):
            export_verify.verify_export(params, str(out), np.float32)
    finally:
        params.close()


def _red(pixel) -> bool:
    r, g, b = pixel[:3]
    return r > 200 and g < 120 and b < 120


def test_points_drawn_on_the_sampled_frames(media, tmp_path):
    text = 'The ball: <point x="25.0" y="50.0" alt="ball">ball</point>'
    indices = np.array([0, 9, 19, 29])
    answer = Molmo2Answer(text, drawing.find_points(text), np.zeros(0, np.int32), indices, indices / 10.0)
    assert answer.points == [drawing.PointGroup("ball", [(25.0, 50.0)])]
    gif, sheet = predict._draw_video(str(media / "clip.mp4"), answer, str(tmp_path / "clip.points.gif"))
    with Image.open(gif) as image:
        assert image.n_frames == 4 and image.size == (64, 48)
        for k in range(4):
            image.seek(k)
            frame = image.convert("RGB")
            assert _red(frame.getpixel((16, 24))) and not _red(frame.getpixel((50, 5)))
    with Image.open(sheet) as image:
        assert image.size == (4 * 64, 48 + 14)
        assert _red(image.convert("RGB").getpixel((3 * 64 + 16, 24)))  # the last frame's point


def test_html_v2_tracks_drawn_on_the_frames_they_name(media, tmp_path):
    """Molmo2's SFT answers (html-v2): each point on the sampled frame whose time it names."""
    text = '<tracks coords="0.9 1 250 250;2.9 1 750 750">ball</tracks>'
    indices = np.array([0, 9, 19, 29])  # 10 fps: 0.0, 0.9, 1.9, 2.9 s
    answer = Molmo2Answer(text, drawing.find_molmo2_points(text, video=True), np.zeros(0, np.int32), indices,
                          indices / 10.0)
    assert answer.points == [drawing.VideoPointGroup("ball 1", [(25.0, 25.0), (75.0, 75.0)], [0.9, 2.9])]
    gif, _ = predict._draw_video(str(media / "clip.mp4"), answer, str(tmp_path / "clip.points.gif"))
    with Image.open(gif) as image:
        seen = []
        for k in range(4):
            image.seek(k)
            frame = image.convert("RGB")
            seen.append((_red(frame.getpixel((16, 12))), _red(frame.getpixel((48, 36)))))
    assert seen == [(False, False), (True, False), (False, False), (False, True)]


CHAT = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% for c in m.content %}"
        "{% if c.type == 'image' %}<|image|>{% elif c.type == 'video' %}<|video|>{% else %}{{ c.text }}{% endif %}"
        "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_renders_the_media_placeholders(predictor):
    tok = predictor.tokenizer
    assert predictor_molmo2.chat_prompt("Hi", CHAT, tok, num_images=2) == \
        "<|im_start|>user\n<|image|><|image|>Hi<|im_end|>\n<|im_start|>assistant\n"
    assert predictor_molmo2.chat_prompt("Hi", CHAT, tok, video=True).startswith("<|im_start|>user\n<|video|>Hi")
    assert predictor_molmo2.chat_prompt("Hi", None, tok, num_images=1) == "User: Hi Assistant:"
    raw = "User: <|image|> Hi Assistant:"  # already the processor's text: used as written
    assert predictor_molmo2.chat_prompt(raw, CHAT, tok, num_images=1) == raw
    with pytest.raises(ValueError, match="chat template: TemplateError: no system role"):
        predictor_molmo2.chat_prompt("Hi", "{{ raise_exception('no system role') }}", tok)


def test_chat_template_is_read_from_the_folder(folder, media, tmp_path):
    for name in os.listdir(folder):
        if name != "tokenizer_config.json":
            os.symlink(folder / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "bos_token": None, "chat_template": [{"name": "default", "template": CHAT}]}))
    assert predictor_molmo2.read_chat_template(str(tmp_path)) == CHAT
    assert predictor_molmo2.read_chat_template(str(folder)) is None
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content[-1].text }}!")  # it comes first
    predictor = Molmo2Predictor.from_checkpoint(str(tmp_path))
    inputs = predictor.prepare("Hi", images=[str(media / "cat.png")])
    text = predictor.tokenizer.decode(inputs["input_ids"][0][inputs["mm_token_type_ids"][0] == 0].tolist())
    assert text == "Hi!"


def test_processor_for_another_vision_tower_is_one_error_line(folder, media, tmp_path):
    for name in os.listdir(folder):
        if name != "processor_config.json":
            os.symlink(folder / name, tmp_path / name)
    other = dict(PROCESSOR, image_processor=dict(PROCESSOR["image_processor"], size={"height": 28, "width": 28}))
    (tmp_path / "processor_config.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", str(tmp_path), "--image", str(media / "cat.png"), "--prompt", "What?"])
    assert str(e.value.code) == ("error: processor image crops are 28 px of 4 px patches, the model's vision "
                                 "tower takes 24 px of 4")


def test_batch_requests_are_refused_for_molmo2(folder, tmp_path):
    (tmp_path / "requests.jsonl").write_text('{"prompt": "Hi"}\n')
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", str(folder), "--requests", str(tmp_path / "requests.jsonl")])
    assert "--requests (batch mode) is not supported for Molmo2" in str(e.value.code)


def kernel_bytes_per_parameter(model) -> float:
    """Bytes of every Dense kernel as stored (codes at their bit width: XLA packs uint4 two per
    byte on device) plus its float32 scales, per kernel parameter."""
    dense = lora.dense_layers(model).values()
    bits = sum(d.kernel[...].size * jnp.iinfo(d.kernel[...].dtype).bits if jnp.issubdtype(d.kernel[...].dtype,
               jnp.integer) else d.kernel[...].size * 32 for d in dense)
    scales = sum(0 if d.kernel_scale is None else d.kernel_scale[...].size * 32 for d in dense)
    return (bits + scales) / 8 / sum(d.kernel[...].size for d in dense)


@pytest.mark.parametrize("weights, dtype, bound, size", [
    ("int8", jnp.int8, 0.05, (1.0, 1.2)),  # one float32 scale per output channel
    ("nf4", jnp.uint4, 0.5, (0.5, 0.8)),  # one per block of <= 64 inputs (16 or 32 at these widths)
])
def test_int8_and_nf4_weights_keep_molmo2_logits_close_to_float32(folder, predictor, weights, dtype, bound, size):
    """--weights int8 / nf4 on a Molmo2 folder: every Dense kernel (ViT, adapter, decoder, lm_head)
    stored int8 / as 4-bit codes; logits within the bounds test_lora.py holds Molmo to (5% / 50%
    of the largest float32 logit) on a multi-image input; the kernels' bytes per parameter."""
    quantized = Molmo2Predictor.from_checkpoint(str(folder), weights=weights).model
    kernels = [d.kernel[...] for d in lora.dense_layers(quantized).values()]
    assert len(kernels) == len(lora.dense_layers(predictor.model)) and all(k.dtype == dtype for k in kernels)
    inputs = CASES["multi_image"](predictor.model.config)
    mask = inputs["attention_mask"].astype(bool)
    reference, got = (our_forward(m, inputs)[0][mask] for m in (predictor.model, quantized))
    difference = np.max(np.abs(got - reference))
    assert 0 < difference < bound * np.max(np.abs(reference)), (weights, difference)
    assert kernel_bytes_per_parameter(predictor.model) == 4.0
    assert size[0] < kernel_bytes_per_parameter(quantized) < size[1]


def test_predict_runs_a_molmo2_folder_with_nf4_weights(folder, media, capsys):
    assert predict.main(["--checkpoint", str(folder), "--image", str(media / "cat.png"), "--prompt", "What?",
                         "--max-new-tokens", "3", "--weights", "nf4"]) == 0
    assert capsys.readouterr().out.strip()
