#!/usr/bin/env python
"""VQA-RAD-text captions ({train,test}_text.json with image_name, text; images in
"VQA_RAD Image Folder/") -> vqarad_{train,test}.json (captioning, the original's names; the VQA
converter writes vqarad_vqa_*).

    python tools/convert_vqarad_text_to_sharegpt.py      # ./datasets/VQA_RAD -> ./datasets/medcap
"""

from medcap.data.sources import convert_splits, converter_args, exit_on_source_error, read_vqarad_text


def main(argv=None):
    parser = converter_args(__doc__, "./datasets/VQA_RAD")
    parser.add_argument("--seed", type=int, default=0, help="draw of the training instructions")
    args = parser.parse_args(argv)
    read = lambda s: read_vqarad_text(args.data_dir, s, seed=args.seed)  # noqa: E731
    convert_splits("vqarad", read, args.output_dir, args.strict, ("train", "test"))


if __name__ == "__main__":
    with exit_on_source_error():
        main()
