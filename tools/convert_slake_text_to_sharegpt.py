#!/usr/bin/env python
"""SLAKE images + SLAKE-text descriptions -> slake_{train,val,test}.json (captioning)."""

from medcap.data.sources import convert_splits, converter_args, exit_on_source_error, read_slake_text


def main(argv=None):
    parser = converter_args(__doc__, "./datasets/SLAKE")
    parser.add_argument(
        "--text_dir", default=None, help="SLAKE-text folder (default: ./datasets/SLAKE-text, else --data_dir)"
    )
    parser.add_argument("--seed", type=int, default=0, help="draw of the training instructions")
    args = parser.parse_args(argv)
    text_dir = args.text_dir
    if text_dir is None:
        from pathlib import Path

        text_dir = "./datasets/SLAKE-text" if Path("./datasets/SLAKE-text").is_dir() else args.data_dir
    read = lambda s: read_slake_text(args.data_dir, text_dir, s, seed=args.seed)  # noqa: E731
    convert_splits("slake", read, args.output_dir, args.strict)


if __name__ == "__main__":
    with exit_on_source_error():
        main()
