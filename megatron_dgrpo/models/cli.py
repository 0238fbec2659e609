"""``dgrpo convert``: checkpoint conversion between Hugging Face and Megatron layouts.

    dgrpo convert hf-to-megatron --hf DIR --out DIR [--tp N] [--pp N]
    dgrpo convert megatron-to-hf --ckpt DIR --out DIR [--max-shard-size 5GB]
    dgrpo convert reshard        --ckpt DIR --out DIR --tp N --pp N
"""

from __future__ import annotations

import argparse
import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes from '5GB', '500MiB', '1000000' (decimal KB/MB/GB as Hugging Face uses)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5GB, 500MiB)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``hf-to-megatron``, ``megatron-to-hf`` and ``reshard`` sub-commands."""
    directions = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to_megatron = directions.add_parser(
        "hf-to-megatron", help="Hugging Face safetensors dir -> Megatron checkpoint at TP/PP")
    to_megatron.add_argument("--hf", required=True, help="Hugging Face model directory")
    to_megatron.add_argument("--out", required=True, help="new Megatron checkpoint directory")
    to_megatron.add_argument("--tp", type=_positive_int, default=1, help="tensor parallel size")
    to_megatron.add_argument("--pp", type=_positive_int, default=1,
                             help="pipeline parallel size")

    to_hf = directions.add_parser(
        "megatron-to-hf", help="Megatron checkpoint (any TP/PP) -> Hugging Face directory")
    to_hf.add_argument("--ckpt", required=True, help="Megatron checkpoint directory")
    to_hf.add_argument("--out", required=True, help="new Hugging Face model directory")
    to_hf.add_argument("--max-shard-size", type=parse_size, default="5GB",
                       help="largest safetensors file before sharding (default 5GB)")

    reshard = directions.add_parser(
        "reshard", help="Megatron checkpoint -> the same weights at another TP/PP")
    reshard.add_argument("--ckpt", required=True, help="Megatron checkpoint directory")
    reshard.add_argument("--out", required=True, help="new Megatron checkpoint directory")
    reshard.add_argument("--tp", type=_positive_int, required=True,
                         help="tensor parallel size")
    reshard.add_argument("--pp", type=_positive_int, required=True,
                         help="pipeline parallel size")


def run_convert(args: argparse.Namespace) -> int:
    """Run the chosen conversion; returns 0. Bad input raises ValueError/FileExistsError."""
    from megatron_dgrpo.models import convert

    if args.direction == "hf-to-megatron":
        out = convert.hf_to_megatron_checkpoint(args.hf, args.out, args.tp, args.pp)
    elif args.direction == "megatron-to-hf":
        out = convert.megatron_to_hf_checkpoint(args.ckpt, args.out, args.max_shard_size)
    else:
        out = convert.reshard_megatron_checkpoint(args.ckpt, args.out, args.tp, args.pp)
    print(f"wrote {out}")
    return 0
