"""launch.tpu --dry-run prints exactly the gcloud commands a real launch would run."""
import pytest

from launch import tpu

V5P = ["--name", "molmo", "--zone", "us-east5-a", "--project", "proj", "--dry-run"]
V5E_2 = ["--name", "molmo", "--slices", "2", "--zone", "us-west4-a", "--project", "proj", "--dry-run"]
TRAIN = ["--", "python", "-m", "molmo_jax.train", "--config=configs/molmo_72b.py:sft",
         "--workdir=gs://bkt/runs/sft1"]

KILL = ("sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | xargs -r sudo kill -9; "
        "sudo rm -f /tmp/libtpu_lockfile")
LIBTPU = ('export LIBTPU_INIT_ARGS="--xla_tpu_enable_async_collective_fusion=true '
          "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
          "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
          "--xla_tpu_overlap_compute_collective_tc=true "
          '--xla_enable_async_all_gather=true"; ')
INSTALL = ("mkdir -p ~/molmo-jax && tar -xzf ~/molmo-jax.tar.gz -C ~/molmo-jax && cd ~/molmo-jax && "
           "(test -d .venv || python3 -m venv .venv) && .venv/bin/pip install -q --upgrade pip && "
           '.venv/bin/pip install -q -e ".[tpu]"')
PACK = ("git ls-files -z --cached --others --exclude-standard | "
        "tar --null -T - -czf /tmp/molmo-jax.tar.gz")


def dry(argv, capsys):
    assert tpu.main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_v5p_64_single_slice(capsys):
    assert dry(["create", "--accelerator", "v5p-64", *V5P], capsys) == [
        "gcloud compute tpus tpu-vm create molmo --accelerator-type=v5p-64 --version=v2-alpha-tpuv5 "
        "--zone=us-east5-a --project=proj"]
    assert dry(["sync", *V5P], capsys) == [
        PACK,
        "gcloud compute tpus tpu-vm scp /tmp/molmo-jax.tar.gz molmo:molmo-jax.tar.gz --worker=all "
        "--zone=us-east5-a --project=proj",
        f"gcloud compute tpus tpu-vm ssh molmo --worker=all --zone=us-east5-a --project=proj "
        f"--command='{INSTALL}'"]
    assert dry(["run", *V5P, "--run", "sft1", "--cache-dir", "gs://bkt/jax-cache", *TRAIN], capsys) == [
        "gcloud compute tpus tpu-vm ssh molmo --worker=all --zone=us-east5-a --project=proj "
        f"--command='{KILL}; cd ~/molmo-jax && mkdir -p logs/sft1 || exit 1; {LIBTPU}"
        'export JAX_COMPILATION_CACHE_DIR="gs://bkt/jax-cache"; '
        "setsid nohup .venv/bin/python -m molmo_jax.train --config=configs/molmo_72b.py:sft "
        "--workdir=gs://bkt/runs/sft1 "
        "> logs/sft1/$(hostname).log 2>&1 < /dev/null &'"]
    assert dry(["logs", *V5P, "--run", "sft1", "--worker", "3"], capsys) == [
        "gcloud compute tpus tpu-vm ssh molmo --worker=3 --zone=us-east5-a --project=proj "
        "--command='tail -v -n 50 ~/molmo-jax/logs/sft1/*.log'"]
    assert dry(["stop", *V5P], capsys) == [
        f"gcloud compute tpus tpu-vm ssh molmo --worker=all --zone=us-east5-a --project=proj --command='{KILL}'"]
    assert dry(["delete", *V5P], capsys) == [
        "gcloud compute tpus tpu-vm delete molmo --zone=us-east5-a --project=proj --quiet"]


def test_v5e_256_two_slices(capsys):
    assert dry(["create", "--accelerator", "v5e-256", "--spot", *V5E_2], capsys) == [
        "gcloud compute tpus queued-resources create molmo --node-count=2 --node-prefix=molmo "
        "--accelerator-type=v5litepod-256 --runtime-version=v2-alpha-tpuv5-lite --zone=us-west4-a "
        "--project=proj --spot"]
    assert dry(["sync", *V5E_2], capsys) == [
        PACK,
        "gcloud compute tpus queued-resources scp /tmp/molmo-jax.tar.gz molmo:molmo-jax.tar.gz "
        "--node=all --worker=all --zone=us-west4-a --project=proj",
        "gcloud compute tpus queued-resources ssh molmo --node=all --worker=all --zone=us-west4-a "
        f"--project=proj --command='{INSTALL}'"]
    assert dry(["run", *V5E_2, "--run", "pt", "--env", "TPU_STDERR_LOG_LEVEL=0", *TRAIN], capsys) == [
        "gcloud compute tpus queued-resources ssh molmo --node=all --worker=all --zone=us-west4-a "
        f"--project=proj --command='{KILL}; cd ~/molmo-jax && mkdir -p logs/pt || exit 1; {LIBTPU}"
        'export TPU_STDERR_LOG_LEVEL="0"; '
        "setsid nohup .venv/bin/python -m molmo_jax.train --config=configs/molmo_72b.py:sft "
        "--workdir=gs://bkt/runs/sft1 "
        "> logs/pt/$(hostname).log 2>&1 < /dev/null &'"]
    assert dry(["logs", *V5E_2, "--run", "pt", "--worker", "all", "--follow"], capsys) == [
        "gcloud compute tpus queued-resources ssh molmo --node=all --worker=all --zone=us-west4-a "
        "--project=proj --command='tail -v -n 50 -f ~/molmo-jax/logs/pt/*.log'"]
    assert dry(["delete", *V5E_2], capsys) == [
        "gcloud compute tpus queued-resources delete molmo --force --zone=us-west4-a --project=proj --quiet"]


@pytest.mark.parametrize("argv, message", [
    (["create", "--accelerator", "v9-8", *V5P], "unknown TPU accelerator 'v9-8'"),
    (["run", *V5P, "--run", "x"], "give the command to start"),
    (["run", *V5P, "--run", "x", "--env", "NOVALUE", "--", "python", "t.py"], "KEY=VALUE"),
    (["run", *V5P, "--run", "x", "--env", "A=$HOME", "--", "python", "t.py"], "may not contain"),
])
def test_bad_input_is_named(argv, message, capsys):
    assert tpu.main(argv) == 2
    assert message in capsys.readouterr().err
