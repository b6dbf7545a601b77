#!/usr/bin/env python
"""PMC-OA ({train,valid,test}.jsonl with image, caption; images under --image_subdir) -> pmcoa_{train,val,test}.json.

    python tools/convert_pmcoa_to_sharegpt.py      # ./datasets/pmc_oa -> ./datasets/medcap
"""

from medcap.data.sources import (
    PMCOA_IMAGE_DIR,
    convert_splits,
    converter_args,
    exit_on_source_error,
    read_pmcoa,
)


def main(argv=None):
    parser = converter_args(__doc__, "./datasets/pmc_oa")
    parser.add_argument(
        "--image_subdir", default=PMCOA_IMAGE_DIR, help=f"image folder inside --data_dir (default {PMCOA_IMAGE_DIR})"
    )
    parser.add_argument("--seed", type=int, default=0, help="draw of the training instructions")
    args = parser.parse_args(argv)
    read = lambda s: read_pmcoa(args.data_dir, s, args.image_subdir, seed=args.seed)  # noqa: E731
    convert_splits("pmcoa", read, args.output_dir, args.strict)


if __name__ == "__main__":
    with exit_on_source_error():
        main()
