#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and Megatron layouts (same as ``dgrpo convert``).

    python tools/convert_checkpoint.py hf-to-megatron --hf DIR --out DIR --tp 2 --pp 1
    python tools/convert_checkpoint.py megatron-to-hf --ckpt DIR --out DIR
    python tools/convert_checkpoint.py reshard --ckpt DIR --out DIR --tp 1 --pp 1
"""

from __future__ import annotations

import argparse
import sys

from megatron_dgrpo.models.cli import add_convert_arguments, run_convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert checkpoints between Hugging Face and Megatron layouts.")
    add_convert_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_convert(args)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"convert_checkpoint.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
