#!/usr/bin/env python
"""VQA-RAD ("VQA_RAD Dataset Public.json" + "VQA_RAD Image Folder/") -> vqarad_vqa_{train,test}.json.

Test is the official split: phrase_type test_freeform or test_para. (The original's
vqarad_{train,test}.json are VQA-RAD-text captions: convert_vqarad_text_to_sharegpt.py.)
"""

from medcap.data.sources import (
    add_question_styles_arg,
    convert_splits,
    converter_args,
    exit_on_source_error,
    read_vqarad,
    styled,
)


def main(argv=None):
    parser = converter_args(__doc__, "./datasets/VQA_RAD")
    add_question_styles_arg(parser)
    args = parser.parse_args(argv)
    read = styled(lambda s: read_vqarad(args.data_dir, s), args.question_styles)
    convert_splits("vqarad_vqa", read, args.output_dir, args.strict, ("train", "test"))


if __name__ == "__main__":
    with exit_on_source_error():
        main()
