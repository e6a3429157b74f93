"""KV-cache generation: cache decode == full recompute, batched == one-by-one, sampling and stops,
and the official greedy continuation of the golden tiny models."""
import numpy as np
import pytest
from flax import nnx

from molmo_jax.convert.hf_molmo import load_hf_model
from molmo_jax.inference.generate import GenerationConfig, Generator, prompt_bucket, sample_tokens
from molmo_jax.model import config as model_config
from molmo_jax.model.molmo import Molmo

N_NEW = 8  # the length of the golden greedy continuation
GOLDEN_ARCHS = ("qwen2_style", "olmo_style")


@pytest.fixture(scope="module")
def inputs(golden_dir):
    z = np.load(golden_dir / "model" / "inputs.npz")
    return {k: z[k] for k in ("input_ids", "images", "image_masks", "image_input_idx")}


def example(inputs, row):
    """One example of the golden batch alone, trimmed to its own length and crop count."""
    length = int((inputs["input_ids"][row] != -1).sum())
    crops = int((~np.all(inputs["images"][row] == -1, axis=(1, 2))).sum())
    return {"input_ids": inputs["input_ids"][row:row + 1, :length],
            **{k: inputs[k][row:row + 1, :crops] for k in ("images", "image_masks", "image_input_idx")}}


@pytest.fixture(scope="module", params=GOLDEN_ARCHS + ("tiny-moe",))
def generated(request, inputs, golden_dir):
    """The golden tiny models (pre-norm Qwen2 and post-norm OLMo blocks) and a random tiny MoE,
    with their greedy generation for the golden batch (two rows of different lengths and crops)."""
    if request.param in GOLDEN_ARCHS:
        model = load_hf_model(str(golden_dir / "model" / request.param))
    else:
        model = Molmo(model_config.PRESETS[request.param], rngs=nnx.Rngs(0))
    generator = Generator(model)
    out = generator(inputs, GenerationConfig(max_new_tokens=N_NEW, chunk_size=4), return_logits=True)
    return model, generator, out


def test_cache_decode_equals_full_recompute(generated, inputs):
    model, _, out = generated
    lengths = (inputs["input_ids"] != -1).sum(1)
    ids = np.full((2, inputs["input_ids"].shape[1] + N_NEW), -1, np.int32)
    for row, length in enumerate(lengths):
        ids[row, :length] = inputs["input_ids"][row, :length]
        ids[row, length:length + N_NEW] = out.tokens[row]
    logits = np.asarray(model(ids, inputs["images"], inputs["image_masks"], inputs["image_input_idx"]))
    for row, length in enumerate(lengths):
        recomputed = logits[row, length - 1:length - 1 + N_NEW]
        np.testing.assert_allclose(out.logits[row], recomputed, atol=2e-4, rtol=1e-4)
        np.testing.assert_array_equal(out.tokens[row], recomputed.argmax(-1))


def test_golden_greedy_continuation(generated, inputs, golden_dir):
    """Example 0 alone, greedy with the cache: the official tokens and per-step logits."""
    model, generator, _ = generated
    arch = {(False, "dense"): "qwen2_style", (True, "dense"): "olmo_style"}.get(
        (model.config.llm.norm_after, model.config.llm.block_type))
    if arch is None or not (golden_dir / "model" / arch / "outputs.npz").exists():
        return  # the random MoE model has no official continuation
    golden = np.load(golden_dir / "model" / arch / "outputs.npz")
    out = generator(example(inputs, 0), GenerationConfig(max_new_tokens=N_NEW, chunk_size=4), return_logits=True)
    np.testing.assert_array_equal(out.tokens[0], golden["gen_new_tokens"])
    np.testing.assert_allclose(out.logits[0], golden["gen_step_logits"], atol=1e-4, rtol=1e-4)


def test_chunking_does_not_change_tokens(generated, inputs):
    """One step per call and one call for all steps (chunk 16 > N_NEW - 1) give the same tokens as
    chunks of 4 with a cut last chunk."""
    _, generator, out = generated
    for chunk in (1, 16):
        tokens = generator(inputs, GenerationConfig(max_new_tokens=N_NEW, chunk_size=chunk)).tokens
        np.testing.assert_array_equal(tokens, out.tokens)


def test_batched_equals_one_by_one(generated, inputs):
    _, generator, out = generated
    for row in range(2):
        alone = generator(example(inputs, row), GenerationConfig(max_new_tokens=N_NEW, chunk_size=4),
                          return_logits=True)
        np.testing.assert_array_equal(alone.tokens[0], out.tokens[row])
        np.testing.assert_allclose(alone.logits[0], out.logits[row], atol=2e-4, rtol=1e-4)


def test_stop_tokens_strings_and_sampling(generated, inputs):
    model, generator, out = generated
    if model.config.llm.block_type != "dense" or model.config.llm.norm_after:
        return  # decoding logic is shared by all block types: checked once, on the Qwen2-style model
    batch = example(inputs, 0)
    greedy = out.tokens[0]
    stop = generator(batch, GenerationConfig(max_new_tokens=N_NEW, chunk_size=4, stop_token_ids=(int(greedy[2]),)))
    first_stop = int(np.flatnonzero(greedy == greedy[2])[0])
    np.testing.assert_array_equal(stop.tokens[0, :first_stop], greedy[:first_stop])
    assert (stop.tokens[0, first_stop:] == -1).all()

    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    cut = generator(batch, GenerationConfig(max_new_tokens=N_NEW, chunk_size=4, stop_strings=(f"<{greedy[1]}>",)),
                    decode)
    assert cut.texts[0] == decode(greedy[:int(np.flatnonzero(greedy == greedy[1])[0])])

    top1 = generator(batch, GenerationConfig(max_new_tokens=N_NEW, temperature=1.0, top_k=1, seed=3))
    np.testing.assert_array_equal(top1.tokens[0], greedy)
    nucleus = generator(batch, GenerationConfig(max_new_tokens=N_NEW, temperature=0.7, top_p=1e-6, seed=5))
    np.testing.assert_array_equal(nucleus.tokens[0], greedy)
    sampled = [generator(batch, GenerationConfig(max_new_tokens=N_NEW, temperature=5.0, seed=s)).tokens
               for s in (1, 1, 2)]
    np.testing.assert_array_equal(sampled[0], sampled[1])
    assert not np.array_equal(sampled[0], sampled[2])


def test_sampling_filters():
    import jax
    import jax.numpy as jnp
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    draws = np.asarray(sample_tokens(logits, keys, jnp.float32(1.0), jnp.float32(0.75), greedy=False, top_k=0))
    assert set(draws) == {0, 1}  # 0.5 + 0.3 reaches 0.75: tokens 2 and 3 are cut
    draws = np.asarray(sample_tokens(logits, keys, jnp.float32(1.0), jnp.float32(1.0), greedy=False, top_k=3))
    assert set(draws) == {0, 1, 2}
    assert prompt_bucket(1) == 32 and prompt_bucket(427) == 512 and prompt_bucket(512) == 512
    assert prompt_bucket(513) == 640 and prompt_bucket(613) == 640 and prompt_bucket(1025) == 1152


def test_rows_joining_a_running_cache_decode_as_alone(generated, inputs):
    """Continuous batching: example 0 decodes alone in a 2-row cache, example 1 is prefilled alone
    and inserted mid-run, the rows are shifted towards slot 0, and both give Generator's greedy
    tokens, also through the sampling program with per-row temperature 0."""
    import jax
    import jax.numpy as jnp
    from molmo_jax.inference.generate import pad_prompt, decode_steps, insert_row, prefill, shift_cache
    model, generator, out = generated
    if model.config.llm.block_type != "dense" or model.config.llm.norm_after:
        return  # the slot logic is independent of the block type: checked on the Qwen2-style model
    graphdef, state = generator.graphdef, generator.state
    key, one, zeros = jax.random.key(0), jnp.float32(1.0), jnp.zeros(2, jnp.float32)
    rows = []
    for row in range(2):
        batch = example(inputs, row)
        prompt = pad_prompt(batch, prompt_bucket(batch["input_ids"].shape[1]))
        token, row_cache, position, _ = prefill(graphdef, state, prompt, key, one, one,
                                                cache_len=prompt["input_ids"].shape[1], greedy=True, top_k=0)
        rows.append((int(token[0]), row_cache, int(position[0])))
    longest = max(r[1].valid.shape[1] for r in rows)
    cache = model.llm.init_cache(2, 2 * longest + 4 * N_NEW)
    cache = shift_cache(cache, jnp.int32(rows[0][1].valid.shape[1]), jnp.zeros(2, jnp.int32))
    cache = insert_row(cache, rows[0][1], jnp.int32(0))
    starts = [int(cache.index) - rows[0][1].valid.shape[1], int(cache.index)]
    tokens = jnp.array([rows[0][0], 0], jnp.int32)
    positions = jnp.array([rows[0][2], 0], jnp.int32)
    got = [[rows[0][0]], []]

    def decode(tokens, cache, positions, steps, greedy):
        chunk, _, cache, positions = decode_steps(graphdef, state, tokens, cache, positions, key, zeros,
                                                  jnp.ones(2), steps=steps, greedy=greedy, top_k=0,
                                                  keep_logits=False)
        return np.asarray(chunk), cache, positions

    chunk, cache, positions = decode(tokens, cache, positions, 3, True)
    got[0] += chunk[0].tolist()
    # Example 1 joins: room below the index first (the index is past its length here, so no shift).
    need = rows[1][1].valid.shape[1] - int(cache.index)
    if need > 0:
        cache = shift_cache(cache, jnp.int32(need), jnp.array(starts, jnp.int32))
        starts = [s + need for s in starts]
    cache = insert_row(cache, rows[1][1], jnp.int32(1))
    starts[1] = int(cache.index) - rows[1][1].valid.shape[1]
    tokens = jnp.array([chunk[0, -1], rows[1][0]], jnp.int32)
    positions = positions.at[1].set(rows[1][2])
    got[1].append(rows[1][0])
    chunk, cache, positions = decode(tokens, cache, positions, 2, False)
    got[0] += chunk[0].tolist()
    got[1] += chunk[1].tolist()
    index = int(cache.index)
    cache = shift_cache(cache, jnp.int32(-min(starts)), jnp.array(starts, jnp.int32))
    assert int(cache.index) == index - min(starts) and not np.asarray(cache.valid)[:, int(cache.index):].any()
    chunk, cache, positions = decode(jnp.asarray(chunk[:, -1]), cache, positions, N_NEW, True)
    got[0] += chunk[0].tolist()
    got[1] += chunk[1].tolist()
    for row in range(2):
        np.testing.assert_array_equal(np.asarray(got[row][:N_NEW]), out.tokens[row])
