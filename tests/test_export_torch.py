"""Exported checkpoints in PyTorch: transformers' from_pretrained loads the backbone folders and
their outputs equal ours in float32 (CLIP hidden states, CausalLM logits on text); bfloat16
exports load as bfloat16 and equal torch's own rounding of the float32 weights."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

import torch  # the "torch" extra, which `make test` installs
import transformers

from safetensors.torch import load_file  # noqa: E402

from configs import common  # noqa: E402
from molmo_jax.train import hf_interop as export  # noqa: E402
from molmo_jax.convert.hf_molmo import load_hf_model, read_hf_config  # noqa: E402
from molmo_jax.model.config import TINY_MOE  # noqa: E402
from molmo_jax.model.molmo import Molmo  # noqa: E402
from molmo_jax.train.checkpointing import Checkpointer  # noqa: E402


from test_export import tokenizer_dir, train_config  # noqa: E402,F401  (tokenizer_dir: module fixture)


@pytest.fixture(scope="module", params=["qwen2_style", "olmo_style"])
def exported(request, golden_dir, tokenizer_dir, tmp_path_factory):
    """(our Molmo with the golden weights, float32 torch-backbones export, bfloat16 one)."""
    hf = os.path.join(golden_dir, "model", request.param)
    root = tmp_path_factory.mktemp(request.param)
    export.import_hf(hf, str(root / "ckpt"), train_config(read_hf_config(hf)))
    for dtype in ("float32", "bfloat16"):
        export.export_checkpoint(str(root / "ckpt"), str(root / dtype), fmt="torch-backbones", dtype=dtype,
                                 tokenizer=tokenizer_dir, max_shard_bytes=1_000_000)
    return load_hf_model(hf), str(root / "float32"), str(root / "bfloat16")


def text_batch(vocab: int):
    ids = np.random.RandomState(0).randint(0, vocab, (2, 12))
    valid = np.ones_like(ids, bool)
    valid[1, 8:] = False
    return ids, valid


def check_causal_lm(model, folder: str, expected_class: str):
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(folder, "llm"), dtype=torch.float32,
                                                                 output_loading_info=True)
    assert type(hf).__name__ == expected_class
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    ids, valid = text_batch(model.config.llm.vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64))).logits
    ours = model(np.where(valid, ids, -1))
    assert ours.shape == expected.shape
    np.testing.assert_allclose(np.asarray(ours)[valid], expected.numpy()[valid], atol=1e-4, rtol=1e-4)


def test_llm_logits_match(exported):
    model, folder, _ = exported
    check_causal_lm(model, folder, "Olmo2ForCausalLM" if model.config.llm.norm_after else "Qwen2ForCausalLM")


def test_clip_hidden_states_match(exported):
    model, folder, _ = exported
    hf, info = transformers.CLIPVisionModel.from_pretrained(os.path.join(folder, "vision"), dtype=torch.float32,
                                                            output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    vc = model.config.vision
    pixels = torch.randn((2, 3, *vc.image_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
    n, p = vc.num_layers, vc.patch_size
    patches = pixels.reshape(2, 3, vc.grid[0], p, vc.grid[1], p).permute(0, 2, 4, 3, 5, 1).reshape(2, -1, p * p * 3)
    ours = model.vision(patches.numpy(), layers=range(n))
    assert len(expected) == n + 1
    for i, h in enumerate(ours):
        np.testing.assert_allclose(np.asarray(h), expected[i + 1].numpy(), atol=1e-4, rtol=1e-4, err_msg=f"layer {i}")


def test_bfloat16_loads_as_bfloat16(exported):
    _, f32, bf16 = exported
    for part, cls in (("llm", transformers.AutoModelForCausalLM), ("vision", transformers.CLIPVisionModel)):
        model = cls.from_pretrained(os.path.join(bf16, part))  # dtype from config.json
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, part
        reference = cls.from_pretrained(os.path.join(f32, part), dtype=torch.float32).state_dict()
        for key, value in model.state_dict().items():
            assert torch.equal(value, reference[key].to(torch.bfloat16)), key


def test_molmo_bfloat16_export_in_torch(golden_dir, tokenizer_dir, tmp_path):
    """The official-layout folder in bfloat16, read by safetensors into torch."""
    hf = os.path.join(golden_dir, "model", "qwen2_style")
    export.import_hf(hf, str(tmp_path / "ckpt"), train_config(read_hf_config(hf)))
    export.export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "bf16"), dtype="bfloat16",
                             tokenizer=tokenizer_dir)
    shards = [f for f in os.listdir(tmp_path / "bf16") if f.endswith(".safetensors")]
    got = {k: v for f in shards for k, v in load_file(str(tmp_path / "bf16" / f)).items()}
    reference = load_file(os.path.join(hf, "model.safetensors"))
    assert sorted(got) == sorted(reference)
    for key, value in reference.items():
        assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], value.to(torch.bfloat16)), key


def test_moe_llm_exports_as_olmoe(tokenizer_dir, tmp_path):
    model = Molmo(TINY_MOE, rngs=nnx.Rngs(3))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    state = export.training_state(params, common.base_config("sft").optimizer, 10, 0)
    ck = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ck.save(1, state, None, {"step": 1, "model": TINY_MOE.to_dict(), "mesh": {}})
    ck.close()
    export.export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"), fmt="torch-backbones",
                             tokenizer=tokenizer_dir)
    check_causal_lm(model, str(tmp_path / "out"), "OlmoeForCausalLM")
