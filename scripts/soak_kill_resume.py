"""Soak test: ``kill -9`` ``bnlab train`` at random moments, resume, and check that nothing is lost.

Each *campaign* trains one tiny run (MLP on the embedded digits set) with ``bnlab train
--auto-resume``, SIGKILLs it at a uniformly random moment, checks the run folder, and starts it again,
until a run finishes on its own; the final weights, optimiser state and metrics are then compared
with an uninterrupted reference run (bit-identical on CPU). Campaigns repeat until ``--kills`` kills
have been done. After every kill:

* if a ``checkpoint.pt`` existed before the kill, one must still exist and load with
  ``weights_only=True`` (``bnlab.train.load_checkpoint``), with no fewer completed epochs/steps than
  the last one seen (a committed epoch is never lost);
* the next start (``--auto-resume``) must succeed or be killed; any other exit is a failure.

Checkpoint writes are slowed down (``--slow-write`` seconds per 64 KiB chunk, default 0.01) so that
a good fraction of the kills land *inside* a checkpoint write; a leftover ``checkpoint.pt.tmp``
after a kill counts such hits.

``--mode fork`` (default) forks the CLI (``bnlab.cli.main``) from a parent that has already
imported torch (startup ~0 s instead of ~10 s on a loaded machine); ``--mode exec`` runs
``python -m bnlab train`` as a separate program. Usage::

    python scripts/soak_kill_resume.py --kills 100 --out /tmp/soak --json /tmp/soak/result.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from bnlab.cli import main as cli_main  # noqa: E402
from bnlab.train import load_checkpoint  # noqa: E402
from bnlab.train.checkpoint import CheckpointError  # noqa: E402


def _prewarm() -> None:
    """Import what a run imports (sklearn for digits, the trainer, the optimisers) in the parent so
    forked children start training at once and the kill times fall in training, not in imports."""
    import bnlab.train.trainer  # noqa: F401
    from bnlab.data import load

    load("digits")

RUN_ARGS = ["--model", "mlp", "--data", "digits", "--epochs", "8", "--batch-size", "32",
            "--max-steps-per-epoch", "20", "--lr", "0.05", "--seed", "3", "--schedule", "cosine", "--quiet"]

_CHILD_PATCH = """
import time, bnlab.train.checkpoint as _c
_real = _c._write_all
def _slow(f, data, _d={delay}):
    view = memoryview(data)
    for s in range(0, len(view), 1 << 16):
        f.write(view[s:s + (1 << 16)]); f.flush(); time.sleep(_d)
_c._write_all = _slow
"""


def _patch_slow_write(delay: float) -> None:
    if delay > 0:
        exec(_CHILD_PATCH.format(delay=delay), {})


def start(out: Path, mode: str, delay: float, log: Path):
    """Start ``bnlab train ... --auto-resume --out out``; returns a handle with ``pid`` and ``wait()``."""
    argv = ["train", *RUN_ARGS, "--auto-resume", "--out", str(out)]
    if mode == "exec":
        code = _CHILD_PATCH.format(delay=delay) + "import sys; from bnlab.cli import main; sys.exit(main(sys.argv[1:]))"
        return _Popen(subprocess.Popen([sys.executable, "-c", code, *argv], stdout=open(log, "ab"),
                                       stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    pid = os.fork()
    if pid == 0:  # child: the CLI, in-process
        rc = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            _patch_slow_write(delay)
            rc = cli_main(argv)
        except BaseException as e:  # noqa: BLE001 - report anything, then leave without cleanup
            print(f"child crashed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            os._exit(rc)
    return _Fork(pid)


class _Fork:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rc: int | None = None

    def poll(self) -> int | None:
        if self.rc is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.rc = os.waitstatus_to_exitcode(status)
        return self.rc

    def wait(self) -> int:
        if self.rc is None:
            _, status = os.waitpid(self.pid, 0)
            self.rc = os.waitstatus_to_exitcode(status)
        return self.rc


class _Popen:
    def __init__(self, p: subprocess.Popen) -> None:
        self.p, self.pid = p, p.pid

    def poll(self):
        return self.p.poll()

    def wait(self):
        return self.p.wait()


def run_to_end(out: Path, mode: str, delay: float, log: Path) -> tuple[int, float]:
    t = time.perf_counter()
    rc = start(out, mode, delay, log).wait()
    return rc, time.perf_counter() - t


def snapshot(ckpt: Path) -> tuple[int, int] | None:
    """(epoch, step) of a loadable checkpoint, None if absent; raises CheckpointError if corrupt."""
    if not ckpt.exists():
        return None
    p = load_checkpoint(ckpt)["progress"]
    return int(p["epoch"]), int(p["step"])


def same_final(ref: Path, run: Path) -> list[str]:
    """Differences between two finished run folders (model, optimiser state, metrics)."""
    a, b = load_checkpoint(ref / "checkpoint.pt"), load_checkpoint(run / "checkpoint.pt")
    diffs = [f"model[{k}]" for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    diffs += [f"optimizer.state[{i}].{k}" for i in sa for k in sa[i]
              if isinstance(sa[i][k], torch.Tensor) and not torch.equal(sa[i][k], sb[i][k])]
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "epoch_time"}  # noqa: E731
                          for line in path.read_text().splitlines()]
    if strip(ref / "metrics.jsonl") != strip(run / "metrics.jsonl"):
        diffs.append("metrics.jsonl")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=100, help="total SIGKILLs to deliver (default 100)")
    ap.add_argument("--out", default="/tmp/bnlab-soak", help="scratch folder (wiped)")
    ap.add_argument("--mode", choices=["fork", "exec"], default="fork")
    ap.add_argument("--slow-write", type=float, default=0.01, help="seconds of sleep per 64 KiB written")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    ap.add_argument("--json", default=None, help="write the result summary here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    if args.mode == "fork":
        _prewarm()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    log = root / "children.log"

    rc, t_ref = run_to_end(root / "reference", args.mode, args.slow_write, log)
    if rc != 0:
        print(f"reference run failed (rc {rc}); see {log}", file=sys.stderr)
        return 1
    print(f"reference run: {t_ref:.2f}s", flush=True)

    kills = campaigns = lost = mid_write = resume_failures = mismatched = 0
    events: list[str] = []
    t0 = time.perf_counter()
    while kills < args.kills:
        campaigns += 1
        run = root / f"c{campaigns:03d}"
        ckpt = run / "checkpoint.pt"
        last: tuple[int, int] | None = None
        while True:
            h = start(run, args.mode, args.slow_write, log)
            delay = rng.uniform(0.0, 1.1 * t_ref)
            deadline = time.perf_counter() + delay
            while time.perf_counter() < deadline and h.poll() is None:
                time.sleep(0.005)
            if h.poll() is not None:  # finished (or failed) before the kill
                rc = h.wait()
                if rc != 0:
                    resume_failures += 1
                    events.append(f"campaign {campaigns}: run exited with {rc}")
                break
            os.kill(h.pid, signal.SIGKILL)
            h.wait()
            kills += 1
            if (run / "checkpoint.pt.tmp").exists():
                mid_write += 1
            try:
                now = snapshot(ckpt)
            except CheckpointError as e:
                lost += 1
                events.append(f"kill {kills}: corrupt checkpoint: {e}")
                break
            if last is not None and (now is None or now < last):
                lost += 1
                events.append(f"kill {kills}: checkpoint went from {last} to {now}")
            last = now if now is not None else last
        if resume_failures or lost:
            break
        diffs = same_final(root / "reference", run)
        if diffs:
            mismatched += 1
            events.append(f"campaign {campaigns}: final state differs from the reference: {diffs[:5]}")
        print(f"campaign {campaigns}: {kills} kills so far ({mid_write} mid-write), lost {lost}, "
              f"mismatched {mismatched}, {time.perf_counter() - t0:.0f}s", flush=True)
        shutil.rmtree(run, ignore_errors=True)

    result = {"mode": args.mode, "kills": kills, "campaigns": campaigns, "kills_mid_checkpoint_write": mid_write,
              "runs_with_data_loss": lost, "resume_failures": resume_failures,
              "final_mismatches": mismatched, "reference_run_s": round(t_ref, 2),
              "soak_wall_s": round(time.perf_counter() - t0, 1), "seed": args.seed, "slow_write": args.slow_write,
              "run_args": RUN_ARGS, "torch": torch.__version__, "events": events}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if not (lost or resume_failures or mismatched) else 1


if __name__ == "__main__":
    sys.exit(main())
