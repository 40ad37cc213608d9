#!/usr/bin/env python
"""Compare the optimizers of a sweep: the same command as ``llmtrain-report SWEEP_DIR``.

    python scripts/compare_optimizers.py multirun/2026-01-01/12-00-00 [--target 4.5] [--wandb]

Writes SWEEP_DIR/report.md with the comparison table and the PNG plots next to it; see
``llmtrain/report.py`` for how best lr, tokens-to-target and speed-up are defined.
"""

import sys

from llmtrain.report import main

if __name__ == "__main__":
    sys.exit(main())
