"""The Molmo2 training pipeline on a tiny mixture of released-set files the test writes (video QA
whose videos sit in the download cache, multi-image QA whose images do, one corrupt video and one
example over the crop budget): its packed rows equal build_example + pack_examples of the same
examples, its iterator resumes exactly from a saved state, bad examples are skipped and counted
by cause; the tiny Molmo2 trains a few steps on it with the packed subsegments in its batches."""
import dataclasses
import json
import logging

import grain
import jax
import numpy as np
import pytest

from configs import molmo2_tiny
from data_pipelines import formatting, molmo2_packing as mp, molmo2_pipeline, molmo2_processor
from data_pipelines.mixtures import MixtureIndex
from data_pipelines.image_cache import ImageCache, sniff_video
from data_pipelines.sources import molmo2
from data_pipelines.tokenizer import load_tokenizer
from molmo_jax.train import molmo2_family, trainer
import molmo2_rows
from test_molmo2_predict import PROCESSOR, write_tokenizer
from test_molmo2_sources import make_video, png, write

BUDGET = {"seq_len": 320, "crops": 5, "pooled_tokens": 64, "slots": 9}
NUM_EXAMPLES = 40


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tokenizer / processor folder, the HF folders, the download cache and its manifest, a video folder."""
    root = tmp_path_factory.mktemp("molmo2_pipeline")
    write_tokenizer(root)
    (root / "processor_config.json").write_text(json.dumps(PROCESSOR))
    cache, manifest = ImageCache(str(root / "cache"), sniff=sniff_video), []
    for vid, frames in (("a", 2), ("b", 8)):  # 2 and 4 frames sampled
        url = f"http://videos.test/{vid}.mp4"
        cache.store(url, open(make_video(root / "encoded" / f"{vid}.mp4", n=frames), "rb").read())
        manifest.append({"video_id": vid, "url": url})
    (root / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    (root / "videos").mkdir()
    (root / "videos" / "c.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 cut short" * 10)  # does not decode
    data = root / "data"
    write(str(data / "Molmo2-AskModelAnything"), "HumanQA-00000-of-00001.parquet", [
        {"video_id": "a", "question": "What moves?", "answer": "A grey square."},
        {"video_id": "b", "question": "Is it dark?", "answer": "Yes."},
        {"video_id": "b", "question": "How long is it?", "answer": "Four seconds."},  # b: a tree of two
        {"video_id": "c", "question": "What is it?", "answer": "Nothing."}])
    images = ImageCache(str(root / "images"))
    urls = [f"http://images.test/{i}.png" for i in range(3)]
    for i, url in enumerate(urls):
        images.store(url, png(60 * i))
    qa = lambda q, a: {"question": [q], "answer": [a]}
    write(str(data / "Molmo2-MultiImageQA"), "train-00000-of-00001.parquet", [
        {"image_urls": urls[:2], "qa_pairs": qa("Which is redder?", "The second.")},
        {"image_urls": urls[1:], "qa_pairs": qa("Same colour?", "No.")},
        {"image_urls": urls, "qa_pairs": qa("Three images?", "Yes.")}])  # 6 crops: over the budget
    return root


def tiny_sources(files):
    return {"molmo2_human_qa": molmo2.load("molmo2_human_qa", str(files / "data"), "HumanQA",
                                           video_dir=str(files / "videos"), cache_dir=str(files / "cache"),
                                           manifest=str(files / "manifest.jsonl")),
            "pixmo_multi_image_qa": molmo2.load("pixmo_multi_image_qa", str(files / "data"), "train",
                                                image_dir=str(files / "images"))}


@pytest.fixture(scope="module")
def parts(files):
    tok = load_tokenizer(str(files), pad_to=m2_vocab())
    processor = molmo2_processor.load_config(files)
    preprocess = molmo2_pipeline.Molmo2Preprocess(tok, processor, molmo2_pipeline.pack_config(tok, processor, BUDGET))
    return tiny_sources(files), {"molmo2_human_qa": 1.0, "pixmo_multi_image_qa": 1.0}, preprocess


def m2_vocab():
    return int(molmo2_tiny.get_config("qwen3").model.llm.vocab_size)


def pipeline_of(parts, **kw):
    sources, rates, preprocess = parts
    return molmo2_pipeline.make_pipeline_from_parts(sources, rates, preprocess, seed=3, batch_size=2,
                                                    num_examples=NUM_EXAMPLES, buffer_size=3, prefetch=0, **kw)


def rows_of(batches):
    return [{k: b[k][i] for k in b} for b in batches for i in range(len(b["input_ids"]))]


@pytest.fixture(scope="module")
def run(parts):
    it = iter(pipeline_of(parts))
    batches = list(it)
    return batches, it.stats


def test_rows_are_build_example_and_pack_examples_of_the_same_examples(parts, run):
    sources, rates, preprocess = parts
    built = [e for e in molmo2_pipeline.example_dataset(sources, rates, preprocess, seed=3,
                                                        num_examples=NUM_EXAMPLES) if "skip" not in e]
    rows = rows_of(run[0])
    used, trees, multi = set(), 0, 0
    for row in rows:
        n = int(np.sum(row["input_ids"] != -1))
        group = []
        for j in np.unique(row["subsegment_ids"][:n] // mp.EXAMPLE_SUBSEGMENT_INCREMENT):
            ids = row["input_ids"][:n][row["subsegment_ids"][:n] // mp.EXAMPLE_SUBSEGMENT_INCREMENT == j]
            k = next(k for k, e in enumerate(built) if k not in used and np.array_equal(e["input_ids"], ids))
            used.add(k)
            group.append(built[k])
            trees += int(np.any((built[k].get("subsegment_ids", np.zeros(1)) == 1)))
        want = mp.pack_examples(group, preprocess.pack)
        for key in mp.TEXT_KEYS + ("mm_token_type_ids", "pixel_values", "token_pooling"):
            np.testing.assert_array_equal(row[key], want[key], err_msg=key)
        multi += len(group) > 1
    assert multi and trees  # several examples in a row; a message tree (video b's two questions)
    assert len(used) <= len(built) <= len(used) + 3  # all but the (at most 3) still buffered at the end
    assert run[1].examples == len(used)


def test_tree_options_reach_build_example(parts):
    """max_text_tokens cuts video b's tree of two to its first conversation (still a tree, as the
    official tokenize_message_list makes it)."""
    sources, _, preprocess = parts
    source = sources["molmo2_human_qa"]
    b = next(i for i in range(len(source)) if len(source[i]["message_list"]) == 2)
    rng = np.random.RandomState(0)
    assert set(preprocess(source[b], rng, "molmo2_human_qa")["subsegment_ids"].tolist()) == {10000, 0, 1}
    capped = dataclasses.replace(preprocess, max_text_tokens=2)
    assert set(capped(source[b], rng, "molmo2_human_qa")["subsegment_ids"].tolist()) == {10000, 0}


def test_bad_examples_are_skipped_with_their_cause_counted(parts, caplog):
    with caplog.at_level(logging.WARNING):
        it = iter(pipeline_of(parts))
        list(it)
    assert it.stats.skipped["malformed"] > 0 and it.stats.skipped["too_long"] > 0  # video c; three images
    assert sum(it.stats.skipped.values()) == it.stats.skipped["malformed"] + it.stats.skipped["too_long"]
    assert "does not fit a row: 6 crops/frames > max_crops 5" in caplog.text


def test_the_iterator_resumes_exactly_from_its_saved_state(parts, run):
    it = iter(pipeline_of(parts))
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    assert state["grain"]["buffered"]
    rest = list(it)
    resumed = iter(pipeline_of(parts))
    resumed.set_state(state)
    again = list(resumed)
    assert len(again) == len(rest) == len(run[0]) - 3
    for a, b in zip(rest, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert resumed.stats == it.stats


def test_hosts_share_the_stream(parts):
    """Host i of 2 builds the examples at global indices i, i + 2, ... of the one-host stream."""
    sources, rates, preprocess = parts
    one = molmo2_pipeline.example_dataset(sources, rates, preprocess, seed=3, num_examples=8)
    for host in range(2):
        mine = molmo2_pipeline.example_dataset(sources, rates, preprocess, seed=3, num_examples=8,
                                               process_index=host, process_count=2)
        assert len(mine) == 4
        for k in range(4):
            a, b = mine[k], one[2 * k + host]
            assert a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)


def test_a_group_over_the_pooled_budget_is_split_in_order():
    """The packer bounds tokens and crops; pooled tokens are the row's third budget."""
    group = [{"pixel_values": np.zeros((1, 2, 3)), "image_token_pooling": np.zeros((n, 4), np.int32), "id": i}
             for i, n in enumerate((30, 30, 10, 40, 0))]
    rows = molmo2_pipeline.split_by_pooled_tokens(group, 64)
    assert [[e["id"] for e in row] for row in rows] == [[0, 1], [2, 3, 4]]


def test_video_shapes_rows_keep_the_one_example_layout(files, tmp_path):
    """buffer 0 packs one synthetic video example per row: the rows molmo2_rows.training_row makes,
    less its last input (the EOS, which predicts nothing)."""
    config = molmo2_tiny.get_config("qwen3")
    config.data.tokenizer = config.data.processor = str(files)
    config.data.synthetic_options.video_shapes.out_dir = str(tmp_path)
    config.data.prefetch = 0
    batch = next(iter(molmo2_family.make_pipeline(config)))
    source = molmo2_family.sources(config)["video_shapes"]
    tok = load_tokenizer(str(files), pad_to=m2_vocab())
    processor = molmo2_processor.load_config(files)
    processor = dataclasses.replace(processor, sampling=dataclasses.replace(processor.sampling, max_frames=4))
    example = source[MixtureIndex([1.0], [len(source)], int(config.data.seed))[0][1]]
    inputs = molmo2_processor.process(example["question"], tok, processor, video=example["video"])
    old = molmo2_rows.training_row(inputs, tok.encode(" " + example["answer"]), tok.eos_id,
                                   molmo2_rows.RowBudget(128, 4, 16, 9), (36, 48))
    n = int(np.sum(old["input_ids"] != -1)) - 1
    for key in ("input_ids", "target_tokens", "position_ids", "loss_masks", "mm_token_type_ids"):
        np.testing.assert_array_equal(batch[key][0][:n], old[key][:n], err_msg=key)
        assert np.all(batch[key][0][n:] == (0 if key == "mm_token_type_ids" else -1))
    for key in ("pixel_values", "token_pooling"):
        np.testing.assert_array_equal(batch[key][0], old[key])
    assert np.all(batch["subsegment_ids"][0][:n] == 0)


class Recording(grain.DatasetIterator):
    """The pipeline's iterator, keeping every batch the trainer reads."""

    def __init__(self, it):
        super().__init__(it)
        self.batches = []

    def __next__(self):
        self.batches.append(next(self._parent))
        return self.batches[-1]

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def test_a_few_trainer_steps_on_the_packed_mixture(files, tmp_path):
    config = molmo2_tiny.get_config("qwen3")
    config.data.tokenizer = config.data.processor = str(files)
    config.data.mixture = "molmo2_human_qa"
    config.data.molmo2_dir, config.data.video_dir = str(files / "data"), str(files / "videos")
    config.data.video_cache_dir, config.data.video_manifest = str(files / "cache"), str(files / "manifest.jsonl")
    config.data.seq_len, config.data.row_crops, config.data.row_pooled_tokens = BUDGET["seq_len"], 5, 64
    config.data.pack_buffer, config.data.loss_token_weighting = 2, "root_subsegments_root_tokens"
    config.train.global_batch, config.train.total_steps = 2, 3
    config.checkpoint.every, config.checkpoint.async_save = 3, False
    data = Recording(iter(molmo2_family.make_pipeline(config)))
    history = trainer.train(config, str(tmp_path / "work"), devices=jax.devices()[:1], data_iterator=data)
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)
    examples_per_row = [len(np.unique(r["subsegment_ids"][r["input_ids"] != -1] // mp.EXAMPLE_SUBSEGMENT_INCREMENT))
                        for r in rows_of(data.batches[:3])]
    assert max(examples_per_row) > 1
    kwargs = molmo2_family.model_kwargs(data.batches[0])
    np.testing.assert_array_equal(kwargs["subsegment_ids"], data.batches[0]["subsegment_ids"])


def test_text_is_the_official_qwen3_turns_with_the_style_prefix():
    """official DataFormatter: system_prompt "demo_or_style_v2" puts "<style>: " first except for
    demo and multiple-choice styles; format_messages ("qwen3") wraps user turns, closing the
    previous answer's turn before the next one."""
    example = {"message_list": [{"question": "Why?", "answer": "Because.", "style": "user_qa"},
                                {"messages": ["Q2", "A2", "Q3", "A3"], "style": "video_short_answer"}]}
    (one, two), _ = formatting.format_example(example, molmo2_pipeline.MOLMO2_SFT_FORMAT)
    assert one == ["<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n", "Because."]
    assert two == ["<|im_start|>user\nvideo_short_answer: Q2<|im_end|>\n<|im_start|>assistant\n", "A2",
                   "<|im_end|>\n<|im_start|>user\nQ3<|im_end|>\n<|im_start|>assistant\n", "A3"]


def test_a_mixture_restricted_to_the_sets_here_keeps_its_group_rates(files):
    """The "molmo2" SFT mixture on two of its sets from one group (0.15): they share it by root
    size (3 records each here), and a set outside the mixture is one error."""
    config = molmo2_tiny.get_config("qwen3")
    config.data.tokenizer = config.data.processor = str(files)
    config.data.mixture = "molmo2"
    config.data.mixture_datasets = ["molmo2_human_qa", "pixmo_multi_image_qa_multi_only_max5"]
    config.data.molmo2_dir, config.data.video_dir = str(files / "data"), str(files / "videos")
    config.data.video_cache_dir, config.data.video_manifest = str(files / "cache"), str(files / "manifest.jsonl")
    config.data.image_dir = str(files / "images")
    assert molmo2_family.make_pipeline(config).datasets == {"molmo2_human_qa": 0.5,
                                                            "pixmo_multi_image_qa_multi_only_max5": 0.5}
    config.data.mixture_datasets = ["molmo2_human_qa", "video_shapes"]
    with pytest.raises(ValueError, match=r"mixture_datasets: datasets \['video_shapes'\] are not in the mixture"):
        molmo2_family.make_pipeline(config)
    # data.mixture_rates reweights them (renormalised), and names a set that is not there.
    config.data.mixture_datasets = ["molmo2_human_qa", "pixmo_multi_image_qa_multi_only_max5"]
    config.data.mixture_rates = {"molmo2_human_qa": 3.0}
    assert molmo2_family.make_pipeline(config).datasets == pytest.approx(
        {"molmo2_human_qa": 3 / 3.5, "pixmo_multi_image_qa_multi_only_max5": 0.5 / 3.5})
    config.data.mixture_rates = {"video_shapes": 1.0}
    with pytest.raises(ValueError, match=r"mixture_rates names \['video_shapes'\]"):
        molmo2_family.make_pipeline(config)


def test_mixtures_without_a_source_or_a_formatter_are_refused(files, tmp_path):
    config = molmo2_tiny.get_config("qwen3")
    config.data.tokenizer = config.data.processor = str(files)
    config.data.mixture = "molmo2"
    with pytest.raises(ValueError, match="needs datasets no Molmo2 source serves yet"):
        molmo2_family.make_pipeline(config)
    config.data.mixture = "molmo2_video_track"
    with pytest.raises(ValueError, match="molmo2_video_track: its track answers are not formatted yet"):
        molmo2_family.make_pipeline(config)
    config.data.mixture = "molmo2_syn_captions_subtitle_qa"
    with pytest.raises(ValueError, match="its subtitles are not put in the video text yet"):
        molmo2_family.make_pipeline(config)
    config.data.mixture = "molmo2_human_qa"
    with pytest.raises(ValueError, match="config.data.molmo2_dir is empty"):
        molmo2_family.make_pipeline(config)
    config.data.num_workers = 2
    with pytest.raises(ValueError, match="config.data.num_workers=2: the Molmo2 pipeline runs in the training"):
        molmo2_family.make_pipeline(config)
