"""What an exported folder needs to load anywhere Molmo loads (issue 23) and what a failed write
leaves (issue 18 case 5): the preprocessor config of the training geometry (a demo run of the real
trainer), refused geometries, processor_config.json, --remote-code with a stand-in code folder
(local auto_map, no hub reference, resolved offline by transformers), tokenizer.json from the
demo's sentencepiece model read by AutoTokenizer, the special ids of the backbone configs,
--verify on a faithful and on a corrupted folder, and disk-full / read-only targets."""
import dataclasses
import json
import os
import resource
import subprocess
import sys

import jax
import numpy as np
import pytest
import transformers  # the "torch" extra, which `make test` installs
from flax import nnx

from configs import common, demo
from data_pipelines.multicrop import CropConfig
from data_pipelines.pipeline import crop_fields
from data_pipelines.tokenizer import IMAGE_TOKENS, load_tokenizer
from molmo_jax import export as export_cli
from molmo_jax.convert.hf_folder import INDEX
from molmo_jax.demo.data import tokenizer_text, train_tokenizer
from molmo_jax.model.config import MolmoConfig, TINY_QWEN2
from molmo_jax.model.molmo import Molmo
from molmo_jax.train import hf_interop as export
from molmo_jax.train import trainer
from molmo_jax.train.checkpointing import Checkpointer
from molmo_jax.train.export_verify import verify_export
from test_export import REPO, TextBatches

# A stand-in for the official remote code (which the project must not ship): modules exposing
# the classes the auto_map names, enough for transformers to resolve them from the folder.
STAND_IN = {
    "config_molmo.py": "from transformers import PretrainedConfig\n\n\n"
                       "class MolmoConfig(PretrainedConfig):\n    model_type = 'molmo'\n    stand_in = True\n",
    "modeling_molmo.py": "from transformers import PreTrainedModel\n\nfrom .config_molmo import MolmoConfig\n\n\n"
                         "class MolmoForCausalLM(PreTrainedModel):\n    config_class = MolmoConfig\n",
    "preprocessing_molmo.py": "class MolmoProcessor:\n    pass\n",
    "image_preprocessing_molmo.py": "class MolmoImageProcessor:\n    pass\n",
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """(experiment config, its sentencepiece model, workdir): one step of the real trainer on the
    demo recipe (112 px crops, max_crops 1, margins 2/2) with a tokenizer trained on demo text."""
    root = tmp_path_factory.mktemp("demo")
    cfg = demo.get_config("sft")
    lines = tokenizer_text(cfg, 20)
    spm = train_tokenizer(str(root / "tokenizer"), lines, int(cfg.model.llm.vocab_size) - 12)
    cfg.data.tokenizer = spm
    cfg.train.total_steps, cfg.train.global_batch, cfg.data.seq_len = 1, 2, 16
    cfg.checkpoint.every, cfg.log.tensorboard, cfg.sharding.max_replicated_fraction = 1, False, 1.0
    trainer.train(cfg, str(root / "run"), data_iterator=TextBatches(int(cfg.model.llm.vocab_size)),
                  devices=jax.devices()[:1])
    return cfg, spm, str(root / "run"), lines


def save_random_checkpoint(directory, config: MolmoConfig, meta_extra=None):
    model = Molmo(config, rngs=nnx.Rngs(3))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    state = export.training_state(params, common.base_config("sft").optimizer, 10, 0)
    ck = Checkpointer(str(directory), async_save=False)
    ck.save(1, state, None, {"step": 1, "model": config.to_dict(), "mesh": {}, **(meta_extra or {})})
    ck.close()


def read_json(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def test_demo_export_has_the_training_geometry(demo_run, tmp_path):
    cfg, _, run, _ = demo_run
    out = export.export_checkpoint(run, str(tmp_path / "hf"))  # tokenizer from the checkpoint's meta
    pre = read_json(out, "preprocessor_config.json")
    assert pre["max_crops"] == cfg.data.max_crops == 1
    assert pre["overlap_margins"] == list(cfg.data.overlap_margins) == [2, 2]
    assert pre["base_image_input_size"] == [112, 112] and pre["image_patch_size"] == 14
    assert pre["image_token_length_w"] == pre["image_token_length_h"] == 4
    # What the official processor derives from it: a crop window of 8 - 2 - 2 = 4 patches, not 0.
    crop = CropConfig(crop_size=112, patch_size=14, overlap_margins=tuple(pre["overlap_margins"]),
                      max_crops=pre["max_crops"])
    assert crop.window_patches == 4
    params = export.CheckpointParams(run)  # the trainer recorded the experiment's geometry
    assert params.meta["crop"] == crop_fields(cfg)
    params.close()
    assert read_json(out, "processor_config.json") == {
        "auto_map": {"AutoProcessor": "allenai/Molmo-7B-D-0924--preprocessing_molmo.MolmoProcessor"},
        "processor_class": "MolmoProcessor"}
    assert read_json(out, "config.json")["auto_map"]["AutoModelForCausalLM"].startswith("allenai/Molmo-7B-D-0924--")


def test_old_checkpoint_falls_back_to_release_defaults_and_bad_geometry_is_refused(golden_dir, tmp_path, caplog):
    tokenizer = os.path.join(golden_dir, "molmo-7b-d-hf")
    save_random_checkpoint(tmp_path / "old", TINY_QWEN2)  # no "crop" in its meta
    out = export.export_checkpoint(str(tmp_path / "old"), str(tmp_path / "hf"), tokenizer=tokenizer)
    assert "does not record its crop geometry" in caplog.text
    assert read_json(out, "preprocessor_config.json")["max_crops"] == 12
    wide = TINY_QWEN2.replace(connector=dataclasses.replace(TINY_QWEN2.connector, pool_h=3, pool_w=3))
    save_random_checkpoint(tmp_path / "pool3", wide, {"crop": {"crop_size": 336, "patch_size": 14,
                                                               "overlap_margins": [3, 3], "pool": 3,
                                                               "max_crops": 4}})
    with pytest.raises(export.ExportError, match=r"official Molmo processor cannot express .*pooling 3x3"):
        export.export_checkpoint(str(tmp_path / "pool3"), str(tmp_path / "refused"), tokenizer=tokenizer)
    assert not (tmp_path / "refused").exists()


def write_stand_in(folder):
    os.makedirs(folder)
    for name, text in STAND_IN.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return str(folder)


def test_remote_code_gives_a_local_auto_map(demo_run, tmp_path, monkeypatch):
    _, _, run, _ = demo_run
    code = write_stand_in(tmp_path / "snapshot")
    out = export.export_checkpoint(run, str(tmp_path / "hf"), remote_code=code)
    for name in STAND_IN:
        assert open(os.path.join(out, name)).read() == STAND_IN[name]
    jsons = {n: read_json(out, n) for n in ("config.json", "preprocessor_config.json", "processor_config.json")}
    assert jsons["config.json"]["auto_map"] == {"AutoConfig": "config_molmo.MolmoConfig",
                                                "AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM"}
    assert jsons["preprocessor_config.json"]["auto_map"]["AutoProcessor"] == "preprocessing_molmo.MolmoProcessor"
    assert "allenai" not in json.dumps(jsons) and "--" not in json.dumps([j["auto_map"] for j in jsons.values()])

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = transformers.AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert type(config).__name__ == "MolmoConfig" and config.stand_in  # the folder's own module, offline

    os.remove(os.path.join(code, "modeling_molmo.py"))
    with pytest.raises(export.ExportError, match=r"--remote-code .*missing \['modeling_molmo.py'\]"):
        export.export_checkpoint(run, str(tmp_path / "hf2"), remote_code=code)
    assert not (tmp_path / "hf2").exists()


def test_sentencepiece_tokenizer_json_encodes_like_the_project(demo_run, tmp_path):
    cfg, spm, run, lines = demo_run
    out = export.export_checkpoint(run, str(tmp_path / "hf"))
    assert {"spm.model", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    ours = load_tokenizer(spm, pad_to=int(cfg.model.llm.vocab_size))
    hf = transformers.AutoTokenizer.from_pretrained(out)
    prompts = lines + ["User: Point to the red circles. Assistant:", "  two  spaces and ünïcode ½ 12:45 "]
    for text in prompts:
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text), text
    ids = ours.image_token_ids
    assert hf.convert_tokens_to_ids(list(IMAGE_TOKENS)) == [ids.im_start, ids.im_end, ids.im_patch, ids.im_col,
                                                            ours.image_prompt_id]
    assert ids.im_start == int(cfg.model.llm.vocab_size)  # spec 4.1: above the model's vocab_size
    assert hf.eos_token_id == ours.eos_id and hf.decode(ours.encode(lines[0])) == ours.decode(ours.encode(lines[0]))


def test_backbone_configs_carry_the_special_ids(demo_run, tmp_path):
    cfg, spm, run, _ = demo_run
    out = export.export_checkpoint(run, str(tmp_path / "bb"), fmt="torch-backbones")
    llm = read_json(out, "llm", "config.json")
    ours = load_tokenizer(spm, pad_to=int(cfg.model.llm.vocab_size))
    assert (llm["bos_token_id"], llm["eos_token_id"], llm["pad_token_id"]) == (ours.bos_id, ours.eos_id, ours.eos_id)
    assert max(llm["bos_token_id"], llm["eos_token_id"]) < llm["vocab_size"]
    loaded = transformers.AutoConfig.from_pretrained(os.path.join(out, "llm"))
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (ours.bos_id, ours.eos_id, ours.eos_id)


def test_verify_passes_a_faithful_folder_and_catches_a_corrupted_tensor(demo_run, tmp_path, capsys):
    _, _, run, _ = demo_run
    export_cli.main(["--checkpoint", run, "--out", str(tmp_path / "hf"), "--verify"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "verify (project): max |logits difference| 0" and lines[-1] == str(tmp_path / "hf")

    reports = []
    export.export_checkpoint(run, str(tmp_path / "bf16"), dtype="bfloat16", verify=reports.append)
    assert reports == [{"project": 0.0}]

    # Flip one float32 of a tensor the batch uses (the LM head) inside its shard.
    folder = str(tmp_path / "hf")
    key = "model.transformer.ff_out.weight"
    shard = os.path.join(folder, read_json(folder, INDEX)["weight_map"][key])
    with open(shard, "r+b") as f:
        header_len = int.from_bytes(f.read(8), "little")
        start = json.loads(f.read(header_len))[key]["data_offsets"][0]
        f.seek(8 + header_len + start + 4 * 7)
        f.write(np.float32(1e3).tobytes())
    params = export.CheckpointParams(run)
    try:
        with pytest.raises(export.ExportError, match=r"--verify: .* does not reproduce the checkpoint: project max "
                                                     r"\|logits difference\| \S+ > 1e-05"):
            verify_export(params, folder, np.float32)
    finally:
        params.close()


def test_torch_side_of_verify_says_why_the_stand_in_cannot_run(demo_run, tmp_path):
    """The stand-in code resolves but has no Molmo forward: the report says so instead of a number."""
    _, _, run, _ = demo_run
    reports = []
    export.export_checkpoint(run, str(tmp_path / "hf"), remote_code=write_stand_in(tmp_path / "code"),
                             verify=reports.append)
    assert reports[0]["project"] == 0.0
    assert reports[0]["torch"].startswith("not run: the folder's remote code failed (")


LIMITED_EXPORT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
import molmo_jax.export as cli
cli.main(sys.argv[2:])
"""


def run_export_cli(args, file_limit=resource.RLIM_INFINITY):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", LIMITED_EXPORT, str(file_limit), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_full_disk_or_read_only_target_is_one_line_and_leaves_nothing(demo_run, tmp_path):
    _, _, run, _ = demo_run
    out = tmp_path / "hf"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("the previous export")
    for target, extra in ((out, []), (tmp_path / "old", ["--force"])):
        result = run_export_cli(["--checkpoint", run, "--out", str(target), "--shard-size", "100KB", *extra],
                                file_limit=150_000)  # the first shard fits, a later file does not
        assert result.returncode == 1, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert errors[0].startswith(f"error: --out {target}: cannot write ") and "File too large" in errors[0]
        assert errors[0].endswith("nothing was written")
    assert not out.exists() and sorted(os.listdir(tmp_path / "old")) == ["keep.txt"]
    assert (tmp_path / "old" / "keep.txt").read_text() == "the previous export"
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no partial folder

    if os.geteuid() == 0:  # root writes through permission bits: sysfs refuses new folders to everyone
        read_only = "/sys/molmo-export-test"
    else:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        read_only = str(tmp_path / "ro" / "hf")
    result = run_export_cli(["--checkpoint", run, "--out", read_only])
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert errors[0].startswith(f"error: --out {read_only}: cannot write ") and not os.path.exists(read_only)
