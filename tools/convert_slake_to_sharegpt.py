#!/usr/bin/env python
"""SLAKE VQA (train.json, validate.json or validation.json, test.json) -> slake_vqa_{train,val,test}.json."""

from medcap.data.sources import (
    add_question_styles_arg,
    convert_splits,
    converter_args,
    exit_on_source_error,
    read_slake,
    styled,
)


def main(argv=None):
    parser = converter_args(__doc__, "./datasets/SLAKE")
    parser.add_argument(
        "--lang", default="en", choices=["en", "zh", "all"], help="question language (default en)"
    )
    add_question_styles_arg(parser)
    args = parser.parse_args(argv)
    lang = None if args.lang == "all" else args.lang
    read = styled(lambda s: read_slake(args.data_dir, s, lang), args.question_styles)
    convert_splits("slake_vqa", read, args.output_dir, args.strict)


if __name__ == "__main__":
    with exit_on_source_error():
        main()
