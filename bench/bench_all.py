"""Every bnlab benchmark (``bnlab bench``): ``python bench/bench_all.py [--quick] [--json out.json]``."""

from _common import main

if __name__ == "__main__":
    raise SystemExit(main(None))
