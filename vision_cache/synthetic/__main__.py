"""``python -m vision_cache.synthetic``: write random-weight test models.

    python -m vision_cache.synthetic --family gemma3 --size tiny --seed 0 --out models/
    python -m vision_cache.synthetic --all --out models/                  # every tiny model
    python -m vision_cache.synthetic --all --size realistic --out models/

Test images: ``python -m vision_cache.synthetic.images --out DIR``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vision_cache.synthetic.models import generate
from vision_cache.synthetic.registry import family_names
from vision_cache.synthetic.spec import SIZES


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vision_cache.synthetic",
        description="Write deterministic random-weight vision-language models (GGUF).",
    )
    parser.add_argument(
        "--family", "--arch", dest="family", choices=family_names(), help="model family to generate"
    )
    parser.add_argument("--all", action="store_true", help="every family, at --size")
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args(argv)
    if bool(args.family) == args.all:
        parser.error("give exactly one of --family or --all")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    for family in family_names() if args.all else (args.family,):
        generate(family, args.size, args.seed, args.out, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
