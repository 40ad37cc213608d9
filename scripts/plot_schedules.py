"""Draw every LR schedule of llmtrain.schedules into one PNG (for the README).

    python scripts/plot_schedules.py [--out docs/schedules.png] [--steps 1000] [--warmup 50] [--min-lr-ratio 0.1]

Each curve is ``lr_factor(name, step, ...)`` for the same run length, warmup and floor; WSD is
drawn once per decay shape. The same settings are printed as a table of values at a few steps.
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from llmtrain.schedules import SCHEDULE_NAMES, lr_factor  # noqa: E402


def curves(steps: int, warmup: int, min_lr_ratio: float, decay_ratio: float, num_cycles: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    common = dict(total_steps=steps, warmup_steps=warmup, min_lr_ratio=min_lr_ratio, decay_ratio=decay_ratio,
                  num_cycles=num_cycles)
    for name in SCHEDULE_NAMES:
        shapes = ("linear", "cosine", "1-sqrt") if name == "wsd" else ("linear",)
        for shape in shapes:
            label = f"wsd ({shape})" if name == "wsd" else name
            out[label] = [lr_factor(name, s, decay_shape=shape, **common) for s in range(steps + 1)]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/schedules.png")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--decay-ratio", type=float, default=0.2)
    parser.add_argument("--num-cycles", type=int, default=4)
    args = parser.parse_args(argv)

    data = curves(args.steps, args.warmup, args.min_lr_ratio, args.decay_ratio, args.num_cycles)
    fig, ax = plt.subplots(figsize=(9, 5))
    for label, values in data.items():
        ax.plot(range(len(values)), values, label=label, linewidth=1.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("lr / peak lr")
    ax.set_title(f"llmtrain schedules: {args.steps} steps, warmup {args.warmup}, min_lr_ratio {args.min_lr_ratio}, "
                 f"WSD decay_ratio {args.decay_ratio}", fontsize=10)
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=120)

    marks = [0, args.warmup // 2, args.warmup, args.steps // 2, int(args.steps * 0.9), args.steps]
    print(f"{'schedule':<18}" + "".join(f"{'step ' + str(m):>12}" for m in marks))
    for label, values in data.items():
        print(f"{label:<18}" + "".join(f"{values[m]:>12.4f}" for m in marks))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
