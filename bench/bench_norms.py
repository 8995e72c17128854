"""bnlab benchmark family 'norms': ``python bench/bench_norms.py [--quick] [--json out.json]``."""

from _common import main

if __name__ == "__main__":
    raise SystemExit(main(["norms"]))
