"""bnlab benchmark family 'optim': ``python bench/bench_optim.py [--quick] [--json out.json]``."""

from _common import main

if __name__ == "__main__":
    raise SystemExit(main(["optim"]))
