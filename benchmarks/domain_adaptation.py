"""Unsupervised domain adaptation on Fashion-MNIST shifts: DANN, CDAN+E, MCC and MDD against source-only and the
target-supervised upper bound, 3 adaptation seeds each, through the library call behind ``mtml adapt``.

The source run is trained on clean images (``src/mtml/configs/adapt_fashion_source.yaml``: 5000 labelled
images, MLP 784→256→128, 800 AdamW steps); each target is a config of the ``fashion_shift`` dataset with 3000
unlabelled training images and 2000 labelled test images under the shift. Every method runs 300 Adam steps
(batch 64 source + 64 target rows). The gain over source-only is paired per seed with a 95% Student-t interval
(2 degrees of freedom); the issue's bar is a gain whose interval excludes 0 on at least one shift.

    .venv/bin/python benchmarks/domain_adaptation.py                       # the shipped noise shift
    .venv/bin/python benchmarks/domain_adaptation.py --shifts noise invert blur
    .venv/bin/python benchmarks/domain_adaptation.py --shifts --glyphs         # the font-style shift only

``--glyphs`` adds the font-style shift of ``glyph_shift``: 78 Latin, Greek and Cyrillic letters, source images in
sans fonts (1041 train), target in serif fonts (984 unlabelled, 378 test), the same MLP and budget.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mtml.config import Config, load_config
from mtml.workflows import adapt, train

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "mtml" / "configs"
SEVERITY = {"noise": 0.5, "blur": 2.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shifts", nargs="*", default=["noise"], choices=["noise", "invert", "rotate", "blur"])
    parser.add_argument("--glyphs", action="store_true", help="also the sans → serif glyph shift")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default="dann,cdan,mcc,mdd")
    args = parser.parse_args()
    started = time.time()
    met = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "source"
        train(load_config(CONFIGS / "adapt_fashion_source.yaml"), run)
        for shift in args.shifts:
            target = load_config(CONFIGS / "adapt_fashion_noise_target.yaml")
            options = dict(target.data.options, shift=shift)
            options.pop("severity", None)
            if shift in SEVERITY:
                options["severity"] = SEVERITY[shift]
            target = target.model_copy(update={"name": f"adapt-fashion-{shift}",
                                               "data": target.data.model_copy(update={"options": options})})
            result = adapt(run, target, methods=args.methods, seeds=args.seeds)
            print(f"\n## {shift} ({result.seconds:.0f} s)\n")
            print(result.markdown())
            met += [f"{shift}/{m}" for m, g in result.gains.items()
                    if m != "target_supervised" and g["verdict"] == "gain"]
        if args.glyphs:
            source = load_config(CONFIGS / "adapt_fashion_source.yaml").to_dict()
            source["data"] = {"dataset": "glyph_shift", "options": {"domain": "source"}}
            source["name"] = "adapt-glyphs-source"
            train(Config.from_dict(source), Path(tmp) / "glyphs")
            target = Config.from_dict({"name": "adapt-glyphs-serif", "seed": 0, "threads": 1,
                                       "data": {"dataset": "glyph_shift", "options": {"domain": "target"}}})
            result = adapt(Path(tmp) / "glyphs", target, methods=args.methods, seeds=args.seeds)
            print(f"\n## glyphs sans → serif ({result.seconds:.0f} s)\n")
            print(result.markdown())
            met += [f"glyphs/{m}" for m, g in result.gains.items()
                    if m != "target_supervised" and g["verdict"] == "gain"]
    print(f"DA beats source-only with a 95% CI above 0: {', '.join(met) or 'nowhere'}  ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
