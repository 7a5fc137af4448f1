#!/usr/bin/env python3
"""Shrinks fuzz/corpus/<target> to a few tens of files (docs/fuzzing.md).

`cargo fuzz cmin` keeps every input that adds any coverage feature: hundreds
of files for these targets. The committed corpus is replayed by `cargo test`
and seeds later runs, so it trades the last edges for size:

1. libFuzzer's set-cover merge of fuzz/corpus/<target> and fuzz/work/<target>
   into a scratch directory (every edge still covered);
2. the edges of each of those files, one file per run;
3. the hand-written seeds (files with a name that is not a SHA-1) that add
   edges, then greedily the file with the most new edges per byte, while it
   adds at least --min-gain edges.

Run after `cargo fuzz build` (RUSTC_BOOTSTRAP=1 on stable), from anywhere:
    fuzz/minimize.py config --min-gain 15
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

FUZZ = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.join(FUZZ, "target", "x86_64-unknown-linux-gnu", "release")
HASH = re.compile(r"^[0-9a-f]{40}$")


def run(binary, *args):
    subprocess.run(["nice", "-n", "15", binary, *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def edges(binary, path, scratch):
    """Every coverage edge one input reaches (a one-file merge lists them all)."""
    one = os.path.join(scratch, "one")
    shutil.rmtree(one, ignore_errors=True)
    os.makedirs(os.path.join(one, "in"))
    os.makedirs(os.path.join(one, "out"))
    shutil.copy(path, os.path.join(one, "in"))
    control = os.path.join(one, "control")
    run(binary, "-merge=1", "-use_counters=0", f"-merge_control_file={control}",
        os.path.join(one, "out"), os.path.join(one, "in"))
    with open(control) as f:
        for line in f:
            if line.startswith("COV "):
                return set(map(int, line.split()[2:]))
    return set()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target")
    p.add_argument("--min-gain", type=int, default=10, help="edges a file must add to be kept")
    a = p.parse_args()
    binary = os.path.join(BIN, a.target)
    corpus = os.path.join(FUZZ, "corpus", a.target)
    work = os.path.join(FUZZ, "work", a.target)
    with tempfile.TemporaryDirectory() as scratch:
        pool = os.path.join(scratch, "pool")
        os.makedirs(pool)
        seeds = [f for f in os.listdir(corpus) if not HASH.match(f)]
        for f in seeds:
            shutil.copy(os.path.join(corpus, f), pool)
        inputs = [d for d in (corpus, work) if os.path.isdir(d)]
        run(binary, "-set_cover_merge=1", "-use_counters=0",
            f"-merge_control_file={os.path.join(scratch, 'control')}", pool, *inputs)
        cov = {f: edges(binary, os.path.join(pool, f), scratch) for f in os.listdir(pool)}
        size = {f: os.path.getsize(os.path.join(pool, f)) for f in cov}
        chosen, covered = [], set()
        for f in sorted((f for f in cov if f in seeds), key=lambda f: -len(cov[f])):
            if cov[f] - covered:
                chosen.append(f)
                covered |= cov[f]
        while True:
            gains = [(len(cov[f] - covered), f) for f in cov if f not in chosen]
            gains = [(g / (size[f] + 300), g, f) for g, f in gains if g >= a.min_gain]
            if not gains:
                break
            _, _, best = max(gains)
            chosen.append(best)
            covered |= cov[best]
        total = set().union(*cov.values()) if cov else set()
        shutil.rmtree(corpus)
        os.makedirs(corpus)
        for f in chosen:
            shutil.copy(os.path.join(pool, f), corpus)
        print(f"{a.target}: {len(chosen)} files, {sum(size[f] for f in chosen)} bytes, "
              f"{len(covered)} of {len(total)} edges", file=sys.stderr)


if __name__ == "__main__":
    main()
