"""bnlab benchmark family 'train': ``python bench/bench_train.py [--quick] [--json out.json]``."""

from _common import main

if __name__ == "__main__":
    raise SystemExit(main(["train"]))
