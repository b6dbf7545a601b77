#!/usr/bin/env python
"""Build the demo's mini SLAKE from medical images shipped inside Python packages, in SLAKE's own
on-disk format (imgs/xmlab<N>/source.jpg, train.json, validate.json, test.json) plus SLAKE-text
captions ({train,validation,test}_text.json). Needs pydicom-data and nilearn (`make demo` installs
them) and, with --assets_dir, the volumes tools/fetch_demo_assets.py fetched there (`make
demo-assets`); nothing is downloaded.

    python tools/build_demo_dataset.py --output_dir demo_output/SLAKE --assets_dir demo_output/assets
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", type=Path, default=Path("demo_output/SLAKE"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--assets_dir", type=Path, default=None,
                        help="the fetched volumes (without: installed packages' images only)")  # fmt: skip
    args = parser.parse_args(argv)
    from medcap.demo.slake import build

    counts = build(args.output_dir, seed=args.seed, assets_dir=args.assets_dir)
    print(f"wrote {args.output_dir}: {json.dumps(counts)}")


if __name__ == "__main__":
    from medcap.errors import run_main

    run_main(main)
