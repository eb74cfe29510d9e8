"""Summarise a py-spy raw profile of `tiller serve` by thread role: engine thread, event loop,
worker pool; the model's load (compilation included) is left out.

    py-spy record -o prof.raw --format raw --rate 200 --subprocesses -- \\
        python -m tiller serve --model M.gguf --parallel 16 --threads 2
    python bench/spy_summary.py prof.raw [--top 15] [--seconds S]

Per role: its samples (and, with --seconds, the share of one core over the loaded window: the
profile rate is 200 Hz), then the functions with the most samples *inclusive* (on the stack)
and *exclusive* (at the top of the stack). Without --idle py-spy samples only threads that are
running; stacks that end waiting (WAITING) are counted apart. numba's own threads (the
parallel regions of a step) are not Python threads: py-spy sees only the thread that called
the step.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

RATE = 200  # Hz, the rate the command above asks for
# NOTE: py-spy's idle detection misses threads blocked in these (epoll, a queue's lock), so
# samples ending in them are counted apart as waiting, not as CPU
WAITING = ("EpollSelector.select", "_worker", "Condition.wait", "Event.wait", "Queue.get")


def role(frames: list[str]) -> str:
    """Which thread a stack belongs to, from the functions near its root."""
    names = [f.split(" (", 1)[0] for f in frames]
    if "load_model" in names or "_find_and_load" in names:
        return "load"
    if "Runner._run" in names:
        return "engine thread"
    if "cmd_serve" in names or "run_forever" in names or "BaseEventLoop.run_forever" in names:
        return "event loop"
    if "_WorkItem.run" in names:
        return "worker pool"
    return "other"


def short(frame: str) -> str:
    """`fn (path/to/module.py:123)` -> `fn (module.py)`: lines vary, functions do not."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rsplit('/', 1)[-1]})" if where else name


def summarise(path: Path, top: int, seconds: float | None) -> str:
    total: collections.Counter[str] = collections.Counter()
    waiting: collections.Counter[str] = collections.Counter()
    incl: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    excl: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")[1:]  # the first is the process
        if not frames:
            continue
        n = int(count)
        r = role(frames)
        if frames[-1].split(" (", 1)[0] in WAITING:
            waiting[r] += n
            continue
        total[r] += n
        for f in dict.fromkeys(short(f) for f in frames):
            incl[r][f] += n
        excl[r][short(frames[-1])] += n
    out = []
    for r, n in total.most_common():
        if r == "load":
            out.append(f"## {r}: {n} samples (left out)")
            continue
        share = f", {n / RATE / seconds:.0%} of a core" if seconds else ""
        out.append(f"## {r}: {n} samples ({n / RATE:.1f} s{share}) busy, {waiting[r]} waiting")
        out.append("inclusive:")
        out += [f"  {c / n:6.1%}  {f}" for f, c in incl[r].most_common(top)]
        out.append("exclusive:")
        out += [f"  {c / n:6.1%}  {f}" for f, c in excl[r].most_common(top)]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("raw", type=Path, help="py-spy --format raw output")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--seconds", type=float, default=None,
                   help="wall seconds under load, to express samples as a share of a core")
    args = p.parse_args(argv)
    if not args.raw.is_file():
        p.error(f"{args.raw}: no such file")
    print(summarise(args.raw, args.top, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
