"""bnlab benchmark family 'data': ``python bench/bench_data.py [--quick] [--json out.json]``."""

from _common import main

if __name__ == "__main__":
    raise SystemExit(main(["data"]))
