"""Several examples per training sequence (config.data.examples_per_row): the layout of
packing.pack_row, the model computing exactly what it computes for each example alone, and the
pipeline stage (next-fit order, statistics, exact resume)."""
import json

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines import packing, pipeline
from molmo_jax.model import config as cfg
from molmo_jax.model.attention import subsegment_positions
from molmo_jax.model.molmo import Molmo

# 56 px crops of 14 px patches: 16 patches, pooled 2x2 -> 4 features per crop.
TINY = cfg.TINY_QWEN2.replace(vision=cfg.VisionConfig(image_size=(56, 56), width=32, num_heads=2, head_dim=16,
                                                      mlp_dim=64, num_layers=3, feature_layers=(-1, -3)))
CROPS, Q, P, D = 2, 4, 16, 588
PACK = packing.PackConfig(seq_len=96, max_crops=CROPS - 1, crop_patches=P, patch_dim=D, tokens_per_crop=Q,
                          image_token_ids=(600, 601, 602, 603))


def fake_example(rng, n_text, n_convs, with_image=True):
    """A pack_example output: [BOS][image tokens] then n_convs conversations (subsegments 1..n),
    positions as the official preprocessor gives them (each conversation continues after the image)."""
    n_img = 1 + CROPS * Q if with_image else 1
    n = n_img + n_text
    sub = np.full(n, packing.IMAGE_SUBSEGMENT if with_image else 1, np.int32)
    if with_image:
        sub[n_img:] = 1 + np.arange(n_text) * n_convs // n_text
    ids = rng.randint(1, 500, n).astype(np.int32)
    positions = np.asarray(subsegment_positions(jnp.ones((1, n), bool), jnp.asarray(sub[None])))[0]
    tokens = dict(input_tokens=ids, target_tokens=np.roll(ids, -1), loss_masks=(sub != packing.IMAGE_SUBSEGMENT),
                  position_ids=positions, subsegment_ids=sub)
    if with_image:
        tokens.update(images=rng.randn(CROPS, P, D).astype(np.float32), image_masks=np.ones((CROPS, P), np.float32),
                      image_input_idx=(1 + np.arange(CROPS * Q)).reshape(CROPS, Q).astype(np.int32))
    example = packing.pack_example(tokens, PACK)
    example["skipped"] = np.zeros(len(pipeline.SKIP_CAUSES), np.int32)
    return example


def test_pack_row_layout():
    rng = np.random.RandomState(0)
    a, b, text = fake_example(rng, 20, 2), fake_example(rng, 30, 3), fake_example(rng, 12, 1, with_image=False)
    na, nb, nt = (packing.example_length(e) for e in (a, b, text))
    assert (na, nb, nt) == (29, 39, 13)
    row = packing.pack_row([a, b, text], PACK, examples_per_row=3)
    assert row["input_ids"].shape == (96,) and row["images"].shape == (3 * CROPS, P, D)
    np.testing.assert_array_equal(row["input_ids"][:na + nb + nt],
                                  np.concatenate([e["input_ids"][:n] for e, n in ((a, na), (b, nb), (text, nt))]))
    assert (row["input_ids"][na + nb + nt:] == -1).all() and (row["loss_masks"][na + nb + nt:] == -1).all()
    # subsegments: example j's image -> (j + 1) * 10000, its conversation k -> j * 10000 + k
    np.testing.assert_array_equal(row["subsegment_ids"][:na], a["subsegment_ids"][:na])
    np.testing.assert_array_equal(row["subsegment_ids"][na:na + nb], b["subsegment_ids"][:nb] + 10000)
    assert set(row["subsegment_ids"][na:na + 1 + CROPS * Q]) == {20000}
    assert set(row["subsegment_ids"][na + nb:na + nb + nt]) == {20001}
    # positions are each example's own; image features point into the example's own span
    np.testing.assert_array_equal(row["position_ids"][na:na + nb], b["position_ids"][:nb])
    np.testing.assert_array_equal(row["image_input_idx"][:CROPS], a["image_input_idx"])
    np.testing.assert_array_equal(row["image_input_idx"][CROPS:2 * CROPS], b["image_input_idx"] + na)
    np.testing.assert_array_equal(row["images"][CROPS:2 * CROPS], b["images"])
    assert (row["images"][2 * CROPS:] == -1).all() and (row["image_input_idx"][2 * CROPS:] == -1).all()
    assert int(row["examples"]) == 3 and int(row["truncated"]) == 0

    # one example per row is the unpacked layout
    single = packing.pack_row([a], PACK, examples_per_row=1)
    for key in packing.TEXT_KEYS + ("images", "image_masks", "image_input_idx"):
        np.testing.assert_array_equal(single[key], a[key], err_msg=key)
    with pytest.raises(ValueError, match="do not fit"):
        packing.pack_row([a, b, fake_example(rng, 40, 1)], PACK, examples_per_row=3)   # 29 + 39 + 49 > 96
    with pytest.raises(ValueError, match="do not fit"):
        packing.pack_row([a, b], PACK, examples_per_row=1)


def test_model_sees_each_packed_example_exactly_as_alone():
    """Logits of a packed row equal, at every token of every example, the logits of that example
    alone; and the positions the model derives from the packed subsegment ids are each example's
    own. This is what makes packing a pure speed-up."""
    rng = np.random.RandomState(1)
    examples = [fake_example(rng, 16, 2), fake_example(rng, 20, 1), fake_example(rng, 10, 1, with_image=False),
                fake_example(rng, 18, 3)]
    model = Molmo(TINY.replace(init_scheme="fan_in"), rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, b: m(b["input_ids"], b["images"], b["image_masks"], b["image_input_idx"],
                                     b["position_ids"], b["subsegment_ids"]))
    keys = packing.TEXT_KEYS + ("images", "image_masks", "image_input_idx")
    row = packing.pack_row(examples, PACK, examples_per_row=4)
    packed = np.asarray(forward(model, {k: jnp.asarray(row[k])[None] for k in keys}))[0]
    derived = np.asarray(subsegment_positions(jnp.asarray(row["input_ids"] != -1)[None],
                                              jnp.asarray(row["subsegment_ids"])[None]))[0]
    start = 0
    for example in examples:
        n = packing.example_length(example)
        alone = packing.pack_row([example], PACK, examples_per_row=4)   # same shapes, one example
        solo = np.asarray(forward(model, {k: jnp.asarray(alone[k])[None] for k in keys}))[0]
        np.testing.assert_allclose(packed[start:start + n], solo[:n], atol=2e-5, rtol=2e-5)
        np.testing.assert_array_equal(derived[start:start + n], example["position_ids"][:n])
        start += n
    # and without the subsegment offsets the second example would see the first: not equal
    mixed = dict(row, subsegment_ids=np.where(row["subsegment_ids"] >= 0, row["subsegment_ids"] % 10000 + 1, -1))
    leaky = np.asarray(forward(model, {k: jnp.asarray(mixed[k])[None] for k in keys}))[0]
    n0 = packing.example_length(examples[0])
    assert np.abs(leaky[n0:n0 + 5] - packed[n0:n0 + 5]).max() > 1e-3


class ListIterator(grain.DatasetIterator):
    """A grain iterator over prepared examples with an integer state."""

    def __init__(self, examples):
        super().__init__()
        self.examples, self.i = examples, 0

    def __next__(self):
        if self.i >= len(self.examples):
            raise StopIteration
        self.i += 1
        return self.examples[self.i - 1]

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def test_next_fit_rows_keep_order_and_resume_exactly():
    rng = np.random.RandomState(2)
    lengths = [30, 40, 50, 20, 20, 20, 60, 10, 70, 15]
    examples = [fake_example(rng, n, 1) for n in lengths]
    for i, e in enumerate(examples):
        e["skipped"] = np.eye(len(pipeline.SKIP_CAUSES), dtype=np.int32)[i % 2]
    it = pipeline._PackRowsIterator(ListIterator(examples), PACK, examples_per_row=3)
    rows = list(it)
    sizes = [int(r["examples"]) for r in rows]
    assert sum(sizes) == len(examples) and max(sizes) <= 3
    flat = np.concatenate([r["input_ids"][r["input_ids"] != -1] for r in rows])
    np.testing.assert_array_equal(flat, np.concatenate([e["input_ids"][e["input_ids"] != -1] for e in examples]))
    assert all((r["input_ids"] != -1).sum() <= 96 for r in rows)
    assert sum(int(r["skipped"].sum()) for r in rows) == len(examples)

    # state saved after each row, restored into a fresh iterator: the same continuation
    for cut in range(1, len(rows)):
        it = pipeline._PackRowsIterator(ListIterator(examples), PACK, examples_per_row=3)
        for _ in range(cut):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        fresh = pipeline._PackRowsIterator(ListIterator(examples), PACK, examples_per_row=3)
        fresh.set_state(state)
        rest = list(fresh)
        assert len(rest) == len(rows) - cut
        for got, want in zip(rest, rows[cut:]):
            np.testing.assert_array_equal(got["input_ids"], want["input_ids"])


def test_pipeline_packs_rows_and_counts_examples(golden_dir):
    import ml_collections
    from data_pipelines.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(golden_dir / "molmo-7b-d-hf")
    config = ml_collections.ConfigDict(dict(
        stage="sft", train=dict(global_batch=4),
        model=dict(vision=dict(image_size=(112, 112), patch_size=14), connector=dict(pool_h=2),
                   llm=dict(vocab_size=152064)),
        data=dict(mixture="synthetic", tokenizer="", seq_len=256, max_crops=2, seed=3, num_workers=0,
                  overlap_margins=(2, 2), synthetic_image_size=112, synthetic_examples=500, prefetch=1,
                  examples_per_row=3)))
    it = iter(pipeline.make_pipeline(config, tokenizer=tokenizer))
    first = [next(it) for _ in range(2)]
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(2)]
    assert first[0]["images"].shape == (4, 3 * 3, 64, 588)
    assert first[0]["input_ids"].shape == (4, 256)
    assert it.stats.examples > 4 * 4           # more than one example per row on average
    restored = iter(pipeline.make_pipeline(config, tokenizer=tokenizer))
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert restored.stats == it.stats
    it.close()
    restored.close()
    config.data.examples_per_row = 0
    with pytest.raises(ValueError, match="examples_per_row"):
        pipeline.make_pipeline(config, tokenizer=tokenizer)
