"""Component parity with transformers on random tiny weights converted through our own
backbone converters (float32): CLIP / SigLIP hidden states, Qwen2 and OLMo2 logits."""
import jax
import numpy as np
import pytest
import torch
from flax import nnx

import transformers  # the "torch" extra, which `make test` installs

from molmo_jax.convert import hf_backbones  # noqa: E402
from molmo_jax.convert.links import CheckpointError  # noqa: E402
from molmo_jax.model import config as cfg  # noqa: E402
from molmo_jax.model.llm import LLM  # noqa: E402
from molmo_jax.model.molmo import Molmo  # noqa: E402
from molmo_jax.model.vit import VisionTransformer  # noqa: E402


def randomize(module: torch.nn.Module, seed: int) -> dict:
    """Non-default random weights (norms around 1, biases and matrices O(1/sqrt(fan_in)))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / np.sqrt(p.shape[-1] if p.ndim == 2 else np.prod(p.shape[1:])))
    return {k: v.numpy() for k, v in module.state_dict().items()}


def to_patches(pixels: torch.Tensor, patch: int) -> np.ndarray:
    """[N, 3, H, W] -> [N, (H/p)*(W/p), p*p*3] in (dy, dx, c) order, as the preprocessor does."""
    n, c, h, w = pixels.shape
    x = pixels.reshape(n, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch * c).numpy()


VISION_CASES = {
    "clip": (lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=56,
        patch_size=14, hidden_act="quick_gelu")),
        cfg.VisionConfig(image_size=(56, 56), width=32, num_heads=2, head_dim=16, mlp_dim=64, num_layers=3)),
    "siglip": (lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56,
        patch_size=14)),
        cfg.VisionConfig(kind="siglip", image_size=(56, 56), width=32, num_heads=2, head_dim=16, mlp_dim=64,
                         num_layers=3, activation="gelu_tanh", norm_eps=1e-6, use_cls_token=False, pre_ln=False,
                         patch_bias=True, feature_layers=(-1, -3))),
}


@pytest.mark.parametrize("kind", sorted(VISION_CASES))
def test_vision_hidden_states_match_transformers(kind):
    """Our blocks 0..2 == transformers hidden_states[1..3]; CLIP's 4th block is dropped as the
    releases drop CLIP's 24th."""
    make, vc = VISION_CASES[kind]
    hf = make().eval()
    sd = randomize(hf, seed=1)
    pixels = torch.randn((2, 3, 56, 56), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
    vit = VisionTransformer(vc, rngs=nnx.Rngs(0))
    state = nnx.state(vit, nnx.Param)
    state.replace_by_pure_dict(hf_backbones.vision_params_from_hf(sd, vc))
    nnx.update(vit, state)
    got = vit(to_patches(pixels, 14), layers=(0, 1, 2))
    for i, h in enumerate(got):
        np.testing.assert_allclose(np.asarray(h), expected[i + 1].numpy(), atol=1e-4, rtol=1e-4)



def test_full_clip_model_checkpoint_keys_load():
    """A hub CLIPModel file: `vision_model.` prefix, text tower, projections and the last block
    (Molmo keeps 23 of CLIP's 24) are dropped; anything else unexpected is an error."""
    make, vc = VISION_CASES["clip"]
    sd = randomize(make(), seed=1)
    full = {"vision_model." + k: v for k, v in sd.items()}
    full.update({"text_model.embeddings.token_embedding.weight": np.zeros((8, 4)), "logit_scale": np.zeros(()),
                 "visual_projection.weight": np.zeros((4, 32))})
    text = {k: v for k, v in full.items() if not k.startswith("vision_model.")}
    a = hf_backbones.vision_params_from_hf(full, vc)
    b = hf_backbones.vision_params_from_hf({**sd, **text}, vc)  # transformers-5 names, no prefix
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    with pytest.raises(CheckpointError, match=r"unexpected \['vision_model\.extra'\]"):
        hf_backbones.vision_params_from_hf({**full, "vision_model.extra": np.zeros(1)}, vc)


LLM_CASES = {
    "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=256,
        tie_word_embeddings=False)),
        cfg.LLMConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_hidden_size=192,
                      vocab_size=256, embedding_size=256, norm_eps=1e-6, rope_theta=1e6)),
    "olmo2": (lambda: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=256, rope_theta=5e5, rms_norm_eps=1e-6, max_position_embeddings=256, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)),
        cfg.LLMConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, mlp_hidden_size=192,
                      vocab_size=256, embedding_size=256, norm_eps=1e-6, rope_theta=5e5, qkv_bias=False,
                      qk_norm=True, norm_after=True)),
}


@pytest.fixture(scope="module", params=sorted(LLM_CASES))
def llm_case(request):
    make, lc = LLM_CASES[request.param]
    hf = make().eval()
    sd = randomize(hf, seed=3)
    llm = LLM(lc, rngs=nnx.Rngs(0))
    state = nnx.state(llm, nnx.Param)
    pure = nnx.to_pure_dict(state)
    converted = hf_backbones.llm_params_from_hf(sd, lc)
    converted["embed"]["new_embedding"] = pure["embed"]["new_embedding"]
    state.replace_by_pure_dict(converted)
    nnx.update(llm, state)
    return request.param, hf, sd, llm, lc


def test_llm_logits_match_transformers(llm_case):
    """Right-padded batch: logits equal at the valid positions."""
    _, hf, _, llm, _ = llm_case
    ids = np.random.RandomState(4).randint(0, 256, (2, 12))
    valid = np.ones((2, 12), bool)
    valid[1, 9:] = False
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64))).logits
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
    logits, _, _ = llm(llm.embed_tokens(np.where(valid, ids, -1)), positions, token_valid=valid)
    np.testing.assert_allclose(np.asarray(logits)[valid], expected.numpy()[valid], atol=1e-4, rtol=1e-4)


def test_init_from_backbones_keeps_connector_and_new_rows(llm_case):
    _, _, sd, _, lc = llm_case
    config = cfg.TINY_QWEN2.replace(llm=lc)
    model = Molmo(config, rngs=nnx.Rngs(5))
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    hf_backbones.init_from_backbones(model, llm_state_dict=sd)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_array_equal(after["llm"]["embed"]["embedding"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(after["llm"]["embed"]["new_embedding"], before["llm"]["embed"]["new_embedding"])
    np.testing.assert_array_equal(after["connector"]["pooling"]["wq"]["kernel"],
                                  before["connector"]["pooling"]["wq"]["kernel"])


def test_backbone_mismatch_is_named(llm_case):
    name, _, sd, _, lc = llm_case
    wider = lc.__class__(**{**lc.__dict__, "d_model": 32, "head_dim": 8})
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight: checkpoint shape \(256, 64\)"):
        hf_backbones.llm_params_from_hf(sd, wider)
    with pytest.raises(CheckpointError, match=r"unexpected \['extra\.weight'\]"):
        hf_backbones.llm_params_from_hf({**sd, "extra.weight": np.zeros(1)}, lc)
