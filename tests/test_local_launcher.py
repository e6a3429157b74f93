"""launch.local: N processes on 127.0.0.1 behave as N hosts of one JAX program."""
import json
import sys

import pytest
from test_trainer import CONFIG_FILE, make_tokenizer

from launch import local

# Each "host" contributes its own rows to one global array and sums it with a cross-process jit.
GLOBAL_SUM = """
import sys, jax, numpy as np
pid, n, coord = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=pid)
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")),
                                           np.arange(2, dtype=np.float32) + 10 * pid)
print("RESULT", jax.process_count(), jax.local_device_count(), jax.device_count(),
      float(jax.jit(lambda a: a.sum())(x)))
"""


def test_two_hosts_two_devices_form_one_program(tmp_path):
    code = local.launch(["python", "-c", GLOBAL_SUM, "{process_id}", "{num_processes}", "{coordinator_address}"],
                        hosts=2, devices=2, log_dir=tmp_path, config_overrides=False, timeout=120)
    assert code == 0
    for i in range(2):
        lines = [l for l in (tmp_path / f"process_{i}.log").read_text().splitlines() if l.startswith("RESULT")]
        # 2 processes, 2 local devices each, 4 global; 0+1 + 10+11 = 22 on both.
        assert lines == ["RESULT 2 2 4 22.0"]


def test_config_overrides_name_the_process():
    cmds = local.process_commands(["python", "-m", "molmo_jax.train", "--config=configs/demo.py", "--workdir=w"],
                                  hosts=2, coordinator="127.0.0.1:1234", config_overrides=True)
    assert cmds[1] == [sys.executable, "-m", "molmo_jax.train", "--config=configs/demo.py", "--workdir=w",
                       "--config.distributed.enabled=True",
                       "--config.distributed.coordinator_address=127.0.0.1:1234",
                       "--config.distributed.num_processes=2", "--config.distributed.process_id=1"]


def test_a_failing_host_stops_the_others(tmp_path, capsys):
    # Process 1 fails at once; process 0 would wait forever (as in a collective) if not stopped.
    script = "import sys, time\nif sys.argv[1] == '1': sys.exit('host 1 broke')\ntime.sleep(600)"
    code = local.launch(["python", "-c", script, "{process_id}"], hosts=2, devices=1, log_dir=tmp_path,
                        config_overrides=False, timeout=60)
    assert code == 1
    err = capsys.readouterr().err
    assert "process 1 of 2 failed" in err and "host 1 broke" in err


def losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines)}


def test_demo_trains_the_same_on_two_hosts_as_on_one(tmp_path):
    # test_trainer's tiny pinned config (the demo recipe on a tiny model): what is checked here is
    # the launcher's process layout, not the demo's size.
    (tmp_path / "exp.py").write_text(CONFIG_FILE.format(tokenizer=make_tokenizer(tmp_path), steps=3, tensor=1))
    runs = {}
    for hosts, devices in ((1, 4), (2, 2)):
        workdir = tmp_path / f"{hosts}x{devices}"
        code = local.launch(["python", "-m", "molmo_jax.train", f"--config={tmp_path / 'exp.py'}",
                             f"--workdir={workdir}"], hosts=hosts, devices=devices,
                            log_dir=tmp_path / f"logs_{hosts}x{devices}", config_overrides=hosts > 1, timeout=900)
        assert code == 0
        runs[hosts] = losses(workdir)
    assert sorted(runs[1]) == sorted(runs[2]) == [1, 2, 3]
    for step, loss in runs[1].items():
        assert runs[2][step] == pytest.approx(loss, rel=2e-5), step
