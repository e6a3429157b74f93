"""Training: `python -m molmo_jax.train --config=configs/<file>.py:<stage> --workdir=DIR`."""
