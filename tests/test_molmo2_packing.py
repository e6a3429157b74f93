"""Molmo2 packing (data_pipelines/molmo2_packing.py) and the Molmo2 model on packed rows.

The mask is checked against a numpy transcription of the official Molmo2 forward
(olmo/models/molmo2/molmo2.py: causal | (image tokens of one example), & subsegment rule, & key
valid) and against the rule written out per token; the logits of a packed row against each
example, and each answer of a message tree, run alone (tiny Molmo2, float32, CPU).
"""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from data_pipelines import molmo2_packing as mp
from molmo_jax.model import molmo2_config
from molmo_jax.model.attention_mask import AttentionMask
from molmo_jax.model.molmo2 import Molmo2, image_block_ids
from molmo_jax.train import loss as loss_lib

CONFIG = molmo2_config.TINY_MOLMO2_QWEN3
BOS, EOS = 1, 2
VISION_IDS = tuple(range(500, 508))  # the tiny config's image / frame tokens and markers
PATCHES = CONFIG.vision.num_patches  # 36: 6x6 patches of 4 px
PACK = mp.Molmo2PackConfig(seq_len=112, max_crops=6, crop_patches=PATCHES, patch_dim=CONFIG.vision.patch_dim,
                           max_pooled_tokens=40, pool_width=9, vision_token_ids=VISION_IDS)


def image_media(crops: int, seed: int):
    """(prefix ids, processor arrays) of one image of `crops` crops: 2x2 pooling of each crop's
    6x6 patches -> 9 tokens per crop, laid out [BOS][im_start][im_patch x 9 crops][im_end]."""
    rng = np.random.default_rng(seed)
    windows = np.arange(PATCHES).reshape(3, 2, 3, 2).transpose(0, 2, 1, 3).reshape(9, 4)
    pooling = np.concatenate([windows + c * PATCHES for c in range(crops)]).astype(np.int32)
    prefix = [BOS, CONFIG.image_start_token_id] + [CONFIG.image_patch_id] * pooling.shape[0] + [CONFIG.image_end_token_id]
    pixels = rng.uniform(-1, 1, (crops, PATCHES, CONFIG.vision.patch_dim)).astype(np.float32)
    return prefix, {"pixel_values": pixels, "image_token_pooling": pooling}


def video_media(frames: int, seed: int):
    """(prefix ids, processor arrays) of a video: 3x3 pooling of each frame's 6x6 patches -> 4
    tokens per frame, each frame [frame_start][im_patch x 4][frame_end] (timestamps left out)."""
    rng = np.random.default_rng(seed)
    windows = np.arange(PATCHES).reshape(2, 3, 2, 3).transpose(0, 2, 1, 3).reshape(4, 9)
    pooling = np.concatenate([windows + f * PATCHES for f in range(frames)]).astype(np.int32)
    frame = [CONFIG.frame_start_token_id] + [CONFIG.image_patch_id] * 4 + [CONFIG.frame_end_token_id]
    pixels = rng.uniform(-1, 1, (frames, PATCHES, CONFIG.vision.patch_dim)).astype(np.float32)
    return [BOS] + frame * frames, {"pixel_values_videos": pixels, "video_token_pooling": pooling}


def text(rng, n):
    return rng.integers(3, 400, n).tolist()


@pytest.fixture(scope="module")
def examples():
    """Four examples: one image + one conversation, two crops + a message tree of three
    conversations (one of them two turns), text only, a video of two frames; each with its prefix,
    conversations and processor arrays (image pooling 4 wide, video 9)."""
    rng = np.random.default_rng(0)
    prefix_a, media_a = image_media(1, 1)
    prefix_b, media_b = image_media(2, 2)
    prefix_d, media_d = video_media(2, 3)
    tree = [[text(rng, 4), text(rng, 3)], [text(rng, 3), text(rng, 2), text(rng, 2), text(rng, 3)],
            [text(rng, 5), text(rng, 2)]]
    return [(prefix_a, [[text(rng, 5), text(rng, 4)]], media_a), (prefix_b, tree, media_b),
            ([BOS], [[text(rng, 4), text(rng, 3)]], {}), (prefix_d, [[text(rng, 4), text(rng, 3)]], media_d)]


@pytest.fixture(scope="module")
def packed(examples):
    built = [{**mp.build_example(p, convs, eos=EOS), **media} for p, convs, media in examples]
    return built, mp.pack_examples(built, PACK)


# ----------------------------------------------------------------------------- build_example


def test_message_tree_layout():
    """Subsegments, restarting positions and EOS targets as official tokenize_and_interleave."""
    prefix = [BOS, 500, 502, 501]
    tree = [[[10, 11], [20, 21]], [[12], [22, 23, 24]]]
    out = mp.build_example(prefix, tree, eos=EOS)
    # tokens: prefix + [10 11 20 21] + [12 22 23 24] + EOS, shifted by one.
    np.testing.assert_array_equal(out["input_ids"], [BOS, 500, 502, 501, 10, 11, 20, 21, 12, 22, 23, 24])
    np.testing.assert_array_equal(out["target_tokens"], [500, 502, 501, 10, 11, 20, 21, EOS, 22, 23, 24, EOS])
    np.testing.assert_array_equal(out["subsegment_ids"], [10000] * 4 + [0] * 4 + [1] * 4)
    np.testing.assert_array_equal(out["position_ids"], [0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7])
    np.testing.assert_array_equal(out["loss_masks"], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1])


def test_text_only_tree_positions_restart_at_zero():
    """Official quirk: without media every subsegment, the BOS's too, counts from 0."""
    out = mp.build_example([BOS], [[[10], [20]], [[11], [21]]], eos=EOS)
    np.testing.assert_array_equal(out["subsegment_ids"], [10000, 0, 0, 1, 1])
    np.testing.assert_array_equal(out["position_ids"], [0, 0, 1, 0, 1])


def test_sft_loss_weights():
    """root_subsegments_root_tokens: conversation k's loss tokens (EOS of the last answer not
    counted) times 2 / sqrt(their number) / sqrt(n conversations); pointing sets 0.2 flat."""
    tree = [[[10], [20, 21, 22]], [[11], [23]], [[12], [24, 25, 26, 27, 28, 29, 30, 31, 32]]]
    weight = mp.message_weight("pixmo_ask_model_anything")
    assert weight == mp.MessageWeight(root_subsegments=True, root_length=True)
    out = mp.build_example([BOS], tree, eos=EOS, weight=weight)
    for k, n in enumerate((3, 1, 9)):
        w = out["loss_masks"][(out["subsegment_ids"] == k)]
        expected = 2 / np.sqrt(n) / np.sqrt(3)
        np.testing.assert_allclose(w, [expected] * (n + 1), rtol=1e-6)  # targets: the answer + its EOS
    point = mp.build_example([BOS], tree, eos=EOS, weight=mp.message_weight("cosyn_point"))
    np.testing.assert_allclose(point["loss_masks"][point["loss_masks"] > 0], 0.2, rtol=1e-6)
    assert mp.message_weight("mevis_track") == mp.POINT_WEIGHT
    assert mp.message_weight("molmo2_video_point_minmax_0_5") == mp.POINT_WEIGHT
    assert mp.message_weight("molmo2_cap") == mp.CAPTION_WEIGHT
    assert mp.message_weight("text_vqa", None) == mp.MessageWeight()


def test_single_conversation_counts_its_eos():
    """One conversation (tokenize_message, add_last_eos): root_length counts the final EOS."""
    out = mp.build_example([BOS], [[[10], [20, 21]]], eos=EOS, weight=mp.message_weight("x"))
    assert "subsegment_ids" not in out
    np.testing.assert_array_equal(out["target_tokens"], [10, 20, 21, EOS])
    np.testing.assert_allclose(out["loss_masks"], np.r_[0, 1, 1, 1] * 2 / np.sqrt(3), rtol=1e-6)


def test_max_sequence_length_drops_late_conversations():
    """A conversation whose first loss token would fall past max_sequence_length is dropped and
    not counted for root_subsegments (official tokenize_message_list)."""
    tree = [[[10, 11], [20]], [[12, 13], [21]], [[14, 15], [22]]]
    out = mp.build_example([BOS], tree, eos=EOS, weight=mp.MessageWeight(root_subsegments=True),
                           max_sequence_length=7)
    assert set(out["subsegment_ids"].tolist()) == {10000, 0, 1}
    np.testing.assert_allclose(out["loss_masks"][out["loss_masks"] > 0], 1 / np.sqrt(2), rtol=1e-6)


def official_text_cap(conversations, max_text_tokens):
    """The official tokenize_message_list loop, written out: n_tokens counts the BOS and every
    conversation kept; the one that reaches max_text_tokens is kept, the rest dropped."""
    kept, n_tokens = [], 1
    for conversation in conversations:
        kept.append(conversation)
        n_tokens += sum(len(m) for m in conversation) + len(conversation) // 2 - 1  # + EOS of answers but the last
        if n_tokens >= max_text_tokens:
            break
    return kept


@pytest.mark.parametrize("cap", [2, 6, 7, 11, 100])
def test_max_text_tokens_keeps_the_conversation_that_reaches_it(cap):
    """official test_max_tokens on our ids: [BOS] + conv 0 is 5 tokens, + conv 1 is 9, + conv 2 is 13;
    dropped conversations do not count for root_subsegments."""
    tree = [[[10, 11], [20, 21]], [[12], [22, 23, 24]], [[13, 14], [25, 26]]]
    kept = official_text_cap(tree, cap)
    out = mp.build_example([BOS, 500, 501], tree, eos=EOS, weight=mp.MessageWeight(root_subsegments=True),
                           max_text_tokens=cap)
    want = mp.build_example([BOS, 500, 501], kept, eos=EOS, weight=mp.MessageWeight(root_subsegments=True))
    for key in want:
        np.testing.assert_array_equal(out[key], want[key], err_msg=key)
    assert len(kept) == {2: 1, 6: 2, 7: 2, 11: 3, 100: 3}[cap]
    np.testing.assert_allclose(out["loss_masks"][out["loss_masks"] > 0], 1 / np.sqrt(len(kept)), rtol=1e-6)
    single = mp.build_example([BOS], tree[:1], eos=EOS, max_text_tokens=2)  # a single conversation is never cut
    np.testing.assert_array_equal(single["input_ids"], [BOS, 10, 11, 20, 21])


def test_last_message_loss_only():
    """official tokenize_message: has_loss = is_model and (not last_message_loss_only or last
    message); root_length then counts only those tokens. Multi-turn [u, a, u, a]: the loss is on
    the second answer (+ its EOS) only."""
    turns = [[10], [20, 21], [11], [22, 23, 24]]
    weight = mp.MessageWeight(root_length=True)
    out = mp.build_example([BOS], [turns], eos=EOS, weight=weight, last_message_loss_only=True)
    # targets: 10 20 21 EOS 11 22 23 24 EOS; with the flag only 22 23 24 EOS carry a loss
    np.testing.assert_array_equal(out["target_tokens"], [10, 20, 21, EOS, 11, 22, 23, 24, EOS])
    np.testing.assert_allclose(out["loss_masks"], np.r_[0, 0, 0, 0, 0, 1, 1, 1, 1] * 2 / np.sqrt(4), rtol=1e-6)
    default = mp.build_example([BOS], [turns], eos=EOS, weight=weight)
    np.testing.assert_allclose(default["loss_masks"], np.r_[0, 1, 1, 1, 0, 1, 1, 1, 1] * 2 / np.sqrt(7), rtol=1e-6)
    # in a tree each conversation keeps its last answer, whose final target is the EOS put in
    tree = mp.build_example([BOS], [turns, [[12], [25]]], eos=EOS, last_message_loss_only=True)
    first = tree["subsegment_ids"] == 0
    np.testing.assert_array_equal(tree["target_tokens"][first][tree["loss_masks"][first] > 0], [22, 23, 24, EOS])


def test_bad_inputs():
    with pytest.raises(ValueError, match="loss_token_weighting"):
        mp.message_weight("x", "root_tokens")
    with pytest.raises(ValueError, match="needs a prefix"):
        mp.build_example([BOS], [], eos=EOS)
    with pytest.raises(ValueError, match=r"conversations \[1\] have no answer"):
        mp.build_example([BOS], [[[10], [20]], [[11]]], eos=EOS)


# ----------------------------------------------------------------------------- pack_examples


def test_pack_layout(packed):
    built, row = packed
    lengths = [b["input_ids"].size for b in built]
    starts = np.cumsum([0] + lengths)
    assert row["examples"] == 4 and row["input_ids"].shape == (PACK.seq_len,)
    for j, (b, s) in enumerate(zip(built, starts)):
        span = slice(s, s + lengths[j])
        np.testing.assert_array_equal(row["position_ids"][span], b["position_ids"])
        np.testing.assert_array_equal(row["subsegment_ids"][span],
                                      j * mp.EXAMPLE_SUBSEGMENT_INCREMENT + b.get("subsegment_ids", 0))
    assert np.all(row["input_ids"][starts[-1]:] == -1) and np.all(row["loss_masks"][starts[-1]:] == -1)
    # Pooling points past the crops / frames of the examples before; image rows are widened to the
    # video's 9 slots with -1; padding rows and crops are -1.
    np.testing.assert_array_equal(row["token_pooling"][9:27, :4], built[1]["image_token_pooling"] + PATCHES)
    np.testing.assert_array_equal(row["token_pooling"][27:35], built[3]["video_token_pooling"] + 3 * PATCHES)
    assert np.all(row["token_pooling"][:27, 4:] == -1) and np.all(row["token_pooling"][35:] == -1)
    np.testing.assert_array_equal(row["pixel_values"][1:3], built[1]["pixel_values"])
    np.testing.assert_array_equal(row["pixel_values"][3:5], built[3]["pixel_values_videos"])
    assert np.all(row["pixel_values"][5:] == -1)
    assert row["mm_token_type_ids"].sum() == sum(np.isin(b["input_ids"], VISION_IDS).sum() for b in built)


def test_pack_budgets(packed):
    built, _ = packed
    for field, name in (("max_crops", "crops/frames"), ("max_pooled_tokens", "pooled tokens")):
        with pytest.raises(ValueError, match=f"need .* {name}, the row holds 2"):
            mp.pack_examples(built, dataclasses.replace(PACK, **{field: 2}))
    with pytest.raises(ValueError, match="width 2"):
        mp.pack_examples(built[:1], dataclasses.replace(PACK, pool_width=2))


def test_pack_truncation(packed):
    """Text past seq_len is cut as the official collator cuts it, refusing its two cases."""
    built, _ = packed
    n0 = built[0]["input_ids"].size  # 12 prefix tokens (BOS + image) then the conversation
    row = mp.pack_examples(built[:1], dataclasses.replace(PACK, seq_len=n0 - 2))
    assert row["truncated"] == 2 and row["input_ids"][-1] == built[0]["input_ids"][n0 - 3]
    with pytest.raises(ValueError, match="cut would fall in an image"):
        mp.pack_examples(built[:1], dataclasses.replace(PACK, seq_len=8))
    with pytest.raises(ValueError, match="cut would drop every loss token"):
        mp.pack_examples(built[:1], dataclasses.replace(PACK, seq_len=14))


def test_knapsack_is_optimal():
    """The official dynamic program finds the best subset (brute force over all of them)."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        t, i = rng.integers(1, 6, 7), rng.integers(0, 3, 7)
        value = t + i
        chosen = mp.select_subset_2d_knapsack(t.tolist(), i.tolist(), 10, 4, value.tolist())
        assert t[chosen].sum() <= 10 and i[chosen].sum() <= 4
        best = max(value[list(s)].sum() for r in range(8) for s in itertools.combinations(range(7), r)
                   if t[list(s)].sum() <= 10 and i[list(s)].sum() <= 4)
        assert value[chosen].sum() == best


def test_dynamic_packer():
    """Buffers, then returns the best-filling subset and keeps the new example; a full-length
    example goes straight out."""
    cfg = dataclasses.replace(PACK, seq_len=20, max_crops=2)
    packer = mp.DynamicPacker(cfg, buffer_size=3)
    ex = lambda n, crops=0: {"input_ids": np.zeros(n, np.int32), **(
        {"pixel_values": np.zeros((crops, PATCHES, 48), np.float32), "image_token_pooling": np.zeros((1, 4))}
        if crops else {})}
    assert [packer(ex(n, c)) for n, c in ((12, 1), (8, 2), (8, 0))] == [None, None, None]
    rows = packer(ex(5))
    assert [(r["input_ids"].size, _crops(r)) for r in rows] == [(8, 0), (12, 1)]
    assert [e["input_ids"].size for e in packer.buffered()] == [8, 5]
    assert [e["input_ids"].size for e in packer(ex(20))] == [20]
    with pytest.raises(ValueError, match="buffer_size"):
        mp.DynamicPacker(cfg, buffer_size=0)


def _crops(example):
    return example["pixel_values"].shape[0] if "pixel_values" in example else 0


def test_packed_loss_weights_and_normalisation(examples):
    """SFT weights in a packed row (a pointing set's flat 0.2 beside a default-weighted message
    tree), and the trainer's loss over it equals the official one: CE of every target with
    loss_masks > 0 (labels -100 elsewhere), dotted with the clamped weights, divided by their sum."""
    (prefix_a, convs_a, media_a), (prefix_b, convs_b, media_b) = examples[:2]
    built = [{**mp.build_example(prefix_a, convs_a, eos=EOS, weight=mp.message_weight("cosyn_point")), **media_a},
             {**mp.build_example(prefix_b, convs_b, eos=EOS, weight=mp.message_weight("pixmo_ask_model_anything")),
              **media_b}]
    row = mp.pack_examples(built, PACK)
    n_a = built[0]["input_ids"].size
    np.testing.assert_allclose(row["loss_masks"][:n_a][row["loss_masks"][:n_a] > 0], 0.2, rtol=1e-6)
    sub_b = built[1]["subsegment_ids"]
    for k, conv in enumerate(convs_b):
        answers = sum(len(m) + 1 for m in conv[1::2]) - 1  # the last answer's EOS is not counted
        w = row["loss_masks"][n_a:n_a + sub_b.size][(sub_b == k) & (built[1]["loss_masks"] > 0)]
        np.testing.assert_allclose(w, 2 / np.sqrt(answers) / np.sqrt(len(convs_b)), rtol=1e-6)

    logits = np.random.default_rng(0).normal(size=(1, PACK.seq_len, 64)).astype(np.float32)
    targets = np.where(row["target_tokens"] >= 0, row["target_tokens"] % 64, -1)[None]
    weights = np.maximum(row["loss_masks"], 0)[None]
    sums = loss_lib.weighted_token_losses(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), 0.0)
    ours = float(loss_lib.normalised_loss(sums, sums["weight_sum"]))
    masks = torch.from_numpy(row["loss_masks"])
    labels = torch.from_numpy(targets[0]).long().masked_fill(~(masks > 0), -100)
    ce = torch.nn.functional.cross_entropy(torch.from_numpy(logits[0]), labels, ignore_index=-100, reduction="none")
    clamped = masks * (masks > 0)
    official = float(torch.dot(ce, clamped) / clamped.sum())
    np.testing.assert_allclose(ours, official, rtol=1e-5)


# ----------------------------------------------------------------------------- the mask


def official_mask(row) -> np.ndarray:
    """bool[L, L], transcribed from the official Molmo2 forward (bi_directional_attn="image_tokens")."""
    ids, sub = row["input_ids"], row["subsegment_ids"]
    n = ids.size
    image = np.isin(ids, VISION_IDS)
    example = sub // mp.EXAMPLE_SUBSEGMENT_INCREMENT
    bidir = image[:, None] & image[None, :] & (example[:, None] == example[None, :])
    causal = np.tril(np.ones((n, n), bool))
    return (ids != -1)[None, :] & (causal | bidir) & (sub[:, None] <= sub[None, :])


def rule_mask(built, lengths) -> np.ndarray:
    """bool[L, L] from the rule in words: a token sees earlier (or, between image tokens, any)
    tokens of its own example; within a message tree a conversation sees the prefix and itself."""
    L = PACK.seq_len
    owner, conv, image = np.full(L, -1), np.full(L, -1), np.zeros(L, bool)
    start = 0
    for j, (b, n) in enumerate(zip(built, lengths)):
        owner[start:start + n] = j
        sub = b.get("subsegment_ids", np.zeros(n, int))
        conv[start:start + n] = np.where(sub == mp.ATTEND_ALL_SUBSEGMENT_ID, -1, sub)
        image[start:start + n] = np.isin(b["input_ids"], VISION_IDS)
        start += n
    q, k = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
    same = (owner[q] == owner[k]) & (owner[k] >= 0)
    ordered = (k <= q) | (image[q] & image[k])
    tree = (conv[k] == -1) | (conv[q] == conv[k])
    return same & ordered & tree


def test_packed_mask_is_the_official_one(packed):
    built, row = packed
    mask = AttentionMask(key_valid=jnp.asarray(row["input_ids"] != -1)[None],
                         subsegment_ids=jnp.asarray(row["subsegment_ids"])[None],
                         block_ids=image_block_ids(jnp.asarray(row["mm_token_type_ids"])[None],
                                                   jnp.asarray(row["subsegment_ids"])[None]))
    ours = np.asarray(mask.dense(PACK.seq_len, PACK.seq_len))[0]
    official = official_mask(row)
    np.testing.assert_array_equal(ours, official)
    n = sum(b["input_ids"].size for b in built)  # padding queries: rows are never read
    np.testing.assert_array_equal(ours[:n], rule_mask(built, [b["input_ids"].size for b in built])[:n])


# ----------------------------------------------------------------------------- logits


@pytest.fixture(scope="module")
def models():
    """The same tiny Molmo2 (float32) behind the reference and the chunked attention backends."""
    state = jax.jit(lambda: nnx.state(Molmo2(CONFIG, rngs=nnx.Rngs(0))))()  # eager init is slow on CPU
    out = {}
    for impl in ("reference", "chunked"):
        model = nnx.eval_shape(lambda: Molmo2(CONFIG.replace(attention=impl), rngs=nnx.Rngs(0)))
        nnx.update(model, state)
        out[impl] = model
    return out


@nnx.jit(static_argnames="subsegments")
def forward(model, row, subsegments):
    ids = row["input_ids"]
    return model(jnp.maximum(ids, 0)[None], row["pixel_values"], row["token_pooling"],
                 attention_mask=(ids != -1)[None], position_ids=row["position_ids"][None],
                 mm_token_type_ids=row["mm_token_type_ids"][None],
                 subsegment_ids=row["subsegment_ids"][None] if subsegments else None)[0]


def run(model, row, subsegments=True):
    """Logits float32[L, V] of a pack_examples row; without subsegments the model sees it as one
    plain example (what an example alone gets). Same shapes every call: one compile."""
    keys = ("input_ids", "pixel_values", "token_pooling", "position_ids", "mm_token_type_ids", "subsegment_ids")
    return np.asarray(forward(model, {k: jnp.asarray(row[k]) for k in keys}, subsegments))


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_packed_logits_equal_each_example_alone(models, examples, packed, impl):
    """Every example of the row, and every conversation of the message tree with the shared
    prefix, gives the logits, targets and 0/1 loss masks it gives alone (alone = its own row,
    right-padded to the row's length and its own pooling width, without subsegment ids, reference
    attention)."""
    built, row = packed
    logits = run(models[impl], row)
    start = 0
    for (prefix, convs, media), b in zip(examples, built):
        n = b["input_ids"].size
        sub = b.get("subsegment_ids", np.zeros(n, int))
        for k, conv in enumerate(convs):
            alone = {**mp.build_example(prefix, [conv], eos=EOS), **media}
            at = start + np.flatnonzero((sub == mp.ATTEND_ALL_SUBSEGMENT_ID) | (sub == k) | (len(convs) == 1))
            np.testing.assert_array_equal(row["input_ids"][at], alone["input_ids"])
            # The prefix's last target is conversation 0's first (user) token for every sibling.
            has_loss = alone["loss_masks"] > 0
            np.testing.assert_array_equal(row["target_tokens"][at][has_loss], alone["target_tokens"][has_loss])
            np.testing.assert_array_equal(row["loss_masks"][at], alone["loss_masks"])
            width = media.get("image_token_pooling", np.zeros((0, PACK.pool_width))).shape[1]  # its own K
            single = run(models["reference"], mp.pack_examples([alone], dataclasses.replace(PACK, pool_width=width)),
                         subsegments=False)
            np.testing.assert_allclose(logits[at], single[:at.size], atol=1e-5, rtol=1e-5)
        start += n
