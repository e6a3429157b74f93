"""`make demo`: a tiny Molmo learns to point, count and read clocks on a CPU.

    python -m molmo_jax.demo        # the command line (__main__.py)

data.py (the tokenizer it trains, the held-out scenes), evaluator.py (answers and scores),
report.py (the score table, the answers drawn, the loss curve); the recipe is configs/demo.py.
"""
