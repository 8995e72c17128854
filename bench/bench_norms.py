"""bnlab benchmark family 'norms': ``python bench/bench_norms.py [--quick] [--json out.json]``.

``python bench/bench_norms.py --cbn ROUNDS [--steps ROUNDS] [--json out.json]``: the issue-7 CBN
table instead (every preset vs BN+ReLU and the cbn resnet20 training steps vs bn+SGD, repeated;
``bnlab.benchmarks.norms.cbn_presets`` / ``cbn_train_steps``), one line per measurement.
"""

import argparse
import json
import sys

from _common import main


def cbn_main(argv: list[str]) -> int:
    import torch

    from bnlab.benchmarks.norms import cbn_presets, cbn_train_steps
    from bnlab.benchmarks.timing import Settings, machine_info

    p = argparse.ArgumentParser()
    p.add_argument("--cbn", type=int, required=True, help="rounds of the preset table (0: skip)")
    p.add_argument("--steps", type=int, default=0, help="rounds of the training-step rows")
    p.add_argument("--presets", default=None, help="comma-separated subset of presets")
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    from bnlab.train.allocator import tune_cpu_allocator

    tune_cpu_allocator()
    torch.set_num_threads(1)
    info = machine_info()
    print(json.dumps(info))
    settings = Settings()
    rows = []
    presets = a.presets.split(",") if a.presets else None
    for r in [*cbn_presets(a.cbn, settings, presets=presets), *cbn_train_steps(a.steps, settings)]:
        rows.append(r.to_dict())
        print(f"{r.name:24s} {r.shape:32s} round {r.extra['round']} {r.ours_ms:8.2f} / {r.baseline_ms:8.2f} ms"
              f" = {r.ratio:.2f}  load {r.extra['load1']:.1f}  {r.extra.get('grad_fn', '')}", flush=True)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"machine": info, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    if "--cbn" in sys.argv:
        raise SystemExit(cbn_main(sys.argv[1:]))
    raise SystemExit(main(["norms"]))
