"""python -m molmo_jax.tools.logits on the golden folder: the written logits match the
official ones at valid positions."""
import numpy as np
import pytest

from molmo_jax.tools import logits as logits_tool


def test_logits_tool_on_golden_folder(golden_dir, tmp_path):
    folder = golden_dir / "model" / "olmo_style"
    inputs = dict(np.load(golden_dir / "model" / "inputs.npz"))
    subset = tmp_path / "inputs.npz"
    # Example 1 alone, without position_ids: exercises the default positions and a padding crop.
    np.savez(subset, **{k: v[1:] for k, v in inputs.items() if k != "position_ids"})
    out = tmp_path / "logits.npz"
    assert logits_tool.main(["--checkpoint", str(folder), "--inputs", str(subset), "--out", str(out),
                             "--dtype", "float32"]) == 0
    got = np.load(out)["logits"]
    expected = np.load(folder / "outputs.npz")
    valid = expected["valid_mask"][1:]
    assert got.dtype == np.float32 and got.shape == (1, 427, 512)
    np.testing.assert_allclose(got[valid], expected["logits"][1:][valid], atol=1e-4, rtol=1e-4)


def test_bad_inputs_are_named(golden_dir, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, input_ids=np.zeros((1, 3), np.int32), pixel_values=np.zeros(1))
    code = logits_tool.main(["--checkpoint", str(golden_dir / "model" / "olmo_style"), "--inputs", str(bad),
                             "--out", str(tmp_path / "o.npz")])
    assert code == 2 and "unknown keys ['pixel_values']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs 'image_input_idx'"):
        np.savez(bad, input_ids=np.zeros((1, 3), np.int32), images=np.zeros((1, 1, 576, 588), np.float32))
        logits_tool.read_inputs(str(bad))


def test_not_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    np.savez(tmp_path / "in.npz", input_ids=np.zeros((1, 3), np.int32))
    code = logits_tool.main(["--checkpoint", str(tmp_path), "--inputs", str(tmp_path / "in.npz"),
                             "--out", str(tmp_path / "o.npz")])
    assert code == 2 and "neither an HF Molmo folder" in capsys.readouterr().err
