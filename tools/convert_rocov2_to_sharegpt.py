#!/usr/bin/env python
"""ROCOv2 ({train,valid,test}_captions.csv with ID, Caption; images/{split}/{ID}.jpg) -> rocov2_{train,val,test}.json."""

from medcap.data.sources import convert_splits, converter_args, exit_on_source_error, read_rocov2


def main(argv=None):
    parser = converter_args(__doc__, "./datasets/ROCOv2")
    parser.add_argument("--seed", type=int, default=0, help="draw of the training instructions")
    args = parser.parse_args(argv)
    convert_splits(
        "rocov2", lambda s: read_rocov2(args.data_dir, s, seed=args.seed), args.output_dir, args.strict
    )


if __name__ == "__main__":
    with exit_on_source_error():
        main()
