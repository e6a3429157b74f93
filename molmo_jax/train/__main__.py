"""Entry point: python -m molmo_jax.train --config=configs/demo.py:pretrain --workdir=DIR [--config.key=value ...]

Exit status: 0 when the run finished or stopped cleanly on SIGTERM (after saving); 1 on a
checkpoint that does not fit the config, a workdir held by another trainer, a failed checkpoint
save, or any other error; 2 on a config error (a misspelt key, a value out of range), found
before anything is compiled or written; 3 when the loss became NaN/inf (the last good
checkpoint is kept). The expected failures print one line, without a traceback.
"""
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from molmo_jax.train.checkpointing import CheckpointMismatchError, CheckpointSaveError
from molmo_jax.train.config_checks import ConfigError, unknown_key
from molmo_jax.train.trainer import NonFiniteLossError, train
from molmo_jax.train.workdir_lock import WorkdirLockedError

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config: path/to/file.py:stage", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, tensorboard/")
OVERRIDE = "--config."


def fail(message: str, code: int):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_flags(argv):
    """absl's flag parsing, with one line instead of chained tracebacks for a bad override."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001  ml_collections raises AttributeError, KeyError, ValueError, ...
        config = _config_of(argv)
        if config is not None:
            for arg in argv[1:]:
                if arg.startswith(OVERRIDE):
                    problem = unknown_key(config, arg[len(OVERRIDE):].partition("=")[0])
                    if problem:
                        fail(problem, 2)
        # Otherwise the message's last line says it (a config file's error comes with its traceback).
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        fail(lines[-1] if lines else type(e).__name__, 2)


def _config_of(argv):
    """The ConfigDict that `--config=FILE:ARG` in argv names, or None when it does not load."""
    specs = [a.partition("=")[2] for a in argv[1:] if a.startswith("--config=")]
    if not specs:
        return None
    try:
        return flags.FLAGS["config"].parser.parse(specs[-1])
    except Exception:  # noqa: BLE001  the caller reports the original error instead
        return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("both --config=configs/<file>.py:<stage> and --workdir are required")
    logging.getLogger().setLevel(logging.WARNING)  # orbax / absl chatter
    logging.getLogger("molmo_jax").setLevel(logging.INFO)
    try:
        train(_CONFIG.value, _WORKDIR.value)  # validates the config first
    except ConfigError as e:
        fail(str(e), 2)
    except (CheckpointMismatchError, CheckpointSaveError, WorkdirLockedError) as e:
        fail(str(e), 1)
    except NonFiniteLossError as e:
        logging.getLogger("molmo_jax").error("%s", e)
        sys.exit(3)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
