#!/usr/bin/env python
"""Cache a teacher's top-k log-probs for the off-policy KD baseline (same as `dgrpo teacher-cache`).

    python tools/cache_teacher_topk.py --teacher CKPT --tokenizer TOK --data DIR --out CACHE --k 32
    torchrun --nproc-per-node 2 tools/cache_teacher_topk.py ... --tp 2
"""

import argparse
import sys

from megatron_dgrpo.train.teacher_cache import add_cache_arguments, run_cache

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cache_arguments(parser)
    sys.exit(run_cache(parser.parse_args()))
