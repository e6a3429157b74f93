"""Entry point: python -m molmo_jax.train --config=configs/demo.py:pretrain --workdir=DIR [--config.key=value ...]

Exit status: 0 when the run finished or stopped cleanly on SIGTERM (after saving), 3 when the
loss became NaN/inf (the last good checkpoint is kept), 1 on any other error.
"""
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from molmo_jax.train.trainer import NonFiniteLossError, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config: path/to/file.py:stage", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, tensorboard/")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("both --config=configs/<file>.py:<stage> and --workdir are required")
    logging.getLogger().setLevel(logging.WARNING)  # orbax / absl chatter
    logging.getLogger("molmo_jax").setLevel(logging.INFO)
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except NonFiniteLossError as e:
        logging.getLogger("molmo_jax").error("%s", e)
        sys.exit(3)


if __name__ == "__main__":
    app.run(main)
