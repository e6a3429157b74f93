"""`make demo`: train a tiny Molmo on synthetic PixMo-style data, evaluate it, draw its answers.

The trainer, synthetic data and evaluation land in their own issues; until then this entry point
states what the demo will do instead of pretending to do it.
"""
import sys

PLAN = """molmo-jax demo (not wired up yet)
The demo will:
  1. generate synthetic PixMo-style scenes (pointing, counting, clocks, captions),
  2. train a tiny Molmo from scratch on this CPU with the real trainer and checkpointing,
  3. score it before and after training (pointing F1, counting accuracy, clock accuracy, caption loss),
  4. write PNGs of its answers drawn on held-out images and a loss curve.
"""


def main(argv=None) -> int:
    print(PLAN)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
