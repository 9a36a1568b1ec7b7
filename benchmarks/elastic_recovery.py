"""Recovery time and lost work when a torchrun worker is SIGKILLed (docs/distributed.md, *Elastic runs*).

Starts ``torchrun --nnodes 1 --nproc-per-node 2 --max-restarts K -m mtml train CONFIG --out RUN`` (the issue's
sinusoid command by default), SIGKILLs rank 1 K times at spread-out steps, and prints per failure:

- recovery: seconds from the kill to the first training step logged after the restarted group resumed
  (torchrun noticing the failure, stopping the group, a fresh rendezvous, new interpreters importing torch
  and mtml, rank 0 reading and broadcasting the checkpoint, the first steps);
- lost work: steps trained before the kill that had to be trained again (the last step logged before the kill,
  minus the checkpoint the group resumed from; training steps are logged every 10, so it is exact to 10).

Then it checks the run completed and, with ``--compare``, that its final checkpoint equals an uninterrupted
torchrun run of the same command bit for bit.

    .venv/bin/python benchmarks/elastic_recovery.py --kills 2 --steps 6000 --checkpoint-every 500
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def records(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def rank_pid(agent: int, rank: str) -> int | None:
    """The pid of the worker with ``RANK=rank`` below the torchrun agent ``agent``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env):
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == agent:
                return int(entry.name)
    return None


def command(config: str, out: Path, steps: int, every: int, restarts: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--max-restarts", str(restarts), "-m", "mtml", "train", config, "--quiet", "--out", str(out),
            "--set", "data.options.meta_batch=50", "--set", f"training.max_steps={steps}",
            "--set", "training.eval_every=500", "--set", f"training.checkpoint_every={every}",
            "--set", "training.meta_val_tasks=100", "--set", "training.meta_test_tasks=100"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "examples/configs/sinusoid.yaml"))
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--compare", action="store_true", help="also train uninterrupted and compare final states")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="mtml-elastic-"))
    out = tmp / "run"
    cmd = command(args.config, out, args.steps, args.checkpoint_every, args.kills)
    t_start = time.monotonic()
    agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    # spread out, and mid-way between checkpoints (where a failure loses half an interval)
    targets = [int(args.steps * (i + 1) / (args.kills + 1)) + args.checkpoint_every // 2 for i in range(args.kills)]
    rows = []
    for target in targets:
        while True:  # train until the target step
            recs = records(metrics)
            done = [r["step"] for r in recs if r["kind"] == "train"]
            if done and done[-1] >= target:
                break
            if agent.poll() is not None:
                sys.exit(f"torchrun exited early: {agent.stderr.read() if agent.stderr else ''}")
            time.sleep(0.005)
        pid = rank_pid(agent.pid, "1")
        if pid is None:
            sys.exit("no worker with RANK=1 found")
        last = done[-1]
        n_resumes = sum(r["kind"] == "resume" for r in recs)
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        resumed_at, t_resume = None, None
        while True:
            recs = records(metrics)
            resumes = [r for r in recs if r["kind"] == "resume"]
            if len(resumes) > n_resumes and resumed_at is None:
                resumed_at, t_resume = resumes[-1]["step"], time.monotonic()
            if resumed_at is not None:
                after = [r for r in recs[recs.index(resumes[-1]):] if r["kind"] == "train" and r["step"] > resumed_at]
                if after:
                    t_train = time.monotonic()
                    break
            if agent.poll() is not None:
                sys.exit(f"torchrun gave up: {agent.stderr.read()[-2000:] if agent.stderr else ''}")
            time.sleep(0.005)
        rows.append((last, resumed_at, t_resume - t_kill, t_train - t_kill))
    agent.wait()
    total = time.monotonic() - t_start
    status = json.loads((out / "run.json").read_text())["status"]
    print(f"torchrun exit {agent.returncode}, run {status}, {total:.1f} s in all; command:\n  {' '.join(cmd)}")
    print("| kill | last step logged before the kill | resumed from | lost steps | kill -> resumed (s) | "
          "kill -> training again (s) |")
    print("|---|---|---|---|---|---|")
    for i, (last, resumed, t_res, t_tr) in enumerate(rows, 1):
        print(f"| {i} | {last} | {resumed} | {last - resumed} | {t_res:.2f} | {t_tr:.2f} |")
    if args.compare:
        ref = tmp / "reference"
        t0 = time.monotonic()
        subprocess.run(command(args.config, ref, args.steps, args.checkpoint_every, 0), env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ref_s = time.monotonic() - t0
        import torch

        from mtml.engine import load_checkpoint

        name = f"checkpoints/step-{args.steps:08d}.safetensors"
        a, b = load_checkpoint(ref / name), load_checkpoint(out / name)
        same = a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
        sa, sb = (json.loads((p / "summary.json").read_text())["test"] for p in (ref, out))
        print(f"uninterrupted run: {ref_s:.1f} s; final checkpoint bit-identical: {same}; meta-test equal: {sa == sb}")


if __name__ == "__main__":
    main()
