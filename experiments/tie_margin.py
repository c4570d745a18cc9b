"""Where a paged runner's greedy tokens leave mlx-lm's, how close mlx-lm's own top two
logits were there (a near tie flips under any change of summation order).

Runs tests/test_staged.py's generation (the tests' tiny float32 models, compiled decode
stages, 5 prompts, 14 tokens) per architecture and prints, for each prompt that differs,
the first differing position, mlx-lm's top-two logit gap there and the gap between its
token and ours, also as a share of the largest |logit|:
``python -m experiments.tie_margin [--archs phi3,llama-gqa] [--tokens 14]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mlx_lm.utils import load  # noqa: E402
from models import CONFIGS, make  # noqa: E402
from test_runner import departure, prompts  # noqa: E402
from test_staged import staged_runner  # noqa: E402

from slabserve.engine.generate import greedy_generate  # noqa: E402


def report(arch: str, root: Path, n: int) -> None:
    model, _ = load(str(make(root, arch)))
    runner = staged_runner(model, linear_layout=False)
    ps = prompts(5, seed=11)
    got = greedy_generate(runner, ps, n)
    same = 0
    for i, (p, ours) in enumerate(zip(ps, got, strict=True)):
        left = departure(model, p, ours, n)
        if left is None:
            same += 1
            continue
        k, ref, lg = left
        top = mx.sort(lg)[-2:].tolist()
        scale = float(mx.abs(lg).max())
        ours_gap = float(lg[ref[k]] - lg[ours[k]])
        print(f"{arch} prompt {i} (len {len(p)}): first difference at token {k}: mlx-lm "
              f"{ref[k]} vs ours {ours[k]}; mlx-lm top-2 gap {top[1] - top[0]:.3e} "
              f"({(top[1] - top[0]) / scale:.2e} of max |logit|), its logit of ours "
              f"{ours_gap:.3e} below ({ours_gap / scale:.2e})")
    print(f"{arch}: {same}/{len(ps)} prompts token-exact ({mx.default_device()})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default=",".join(CONFIGS))
    ap.add_argument("--tokens", type=int, default=14)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            report(arch, Path(tmp), args.tokens)


if __name__ == "__main__":
    main()
