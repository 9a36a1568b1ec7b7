"""Raw-pixel cosine nearest-neighbour on the ``glyphs`` meta-test alphabets, next to Omniglot's published figures.

Vinyals et al. (NeurIPS 2016, "Matching Networks for One Shot Learning", table 1, "Pixels Cosine") report
41.7 / 63.2 / 26.7 / 42.6 % for 5-way 1-shot / 5-way 5-shot / 20-way 1-shot / 20-way 5-shot on Omniglot.
The glyphs augmentation is calibrated so that the same baseline lands near these numbers (within ±10 points):
the task is then about as hard for raw pixels as Omniglot. Each row is the mean accuracy over ``--tasks`` test
tasks (each with ``--query`` query images per class) and its 95% confidence half-width.

    .venv/bin/python benchmarks/glyphs_pixel_baseline.py              # full set: renders once (~1–2 min), then cached
    .venv/bin/python benchmarks/glyphs_pixel_baseline.py --split val --tasks 2000
"""

from __future__ import annotations

import argparse
import time

import torch

from mtml.datasets._glyphs import load_glyphs
from mtml.datasets._glyphs_fewshot import glyph_splits, pixel_nn_accuracy

VINYALS = {(5, 1): 41.7, (5, 5): 63.2, (20, 1): 26.7, (20, 5): 42.6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (rendering and alphabet split)")
    parser.add_argument("--tasks", type=int, default=1000, help="test tasks per setting")
    parser.add_argument("--query", type=int, default=5, help="query images per class")
    parser.add_argument("--split", choices=("train", "val", "test"), default="test")
    parser.add_argument("--cache-dir", default=None, help="cache root (default $MTML_CACHE or ~/.cache/mtml)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_glyphs(seed=args.seed, cache_dir=args.cache_dir)
    loaded = time.perf_counter() - start
    test_alphabets = None
    print(f"glyphs: {data.num_classes} characters of {len(data.alphabets)} alphabets, "
          f"{len(data.images)} images; loaded in {loaded:.1f} s from {data.cache_path}")
    print(f"{'setting':<16}{'glyphs (%)':>18}{'Omniglot (%)':>14}{'difference':>12}")
    for (ways, shots), published in VINYALS.items():
        sampler = glyph_splits(data, ways=ways, shots=shots, query_shots=args.query, meta_batch=50,
                               seed=args.seed)[args.split]
        if test_alphabets is None:
            test_alphabets = sorted({data.alphabets[a] for a in data.character_alphabet[sampler.classes].tolist()})
        mean, ci = pixel_nn_accuracy(sampler, tasks=args.tasks, seed=args.seed)
        print(f"{ways}-way {shots}-shot{'':<5}{mean:>11.1f} ± {ci:<4.1f}{published:>14.1f}{mean - published:>+12.1f}")
    print(f"{args.split} split: {len(test_alphabets or [])} alphabets; {args.tasks} tasks per setting, "
          f"{args.query} queries per class")


if __name__ == "__main__":
    main()
