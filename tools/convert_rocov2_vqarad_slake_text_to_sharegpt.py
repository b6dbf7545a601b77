#!/usr/bin/env python
"""ROCOv2-VQARAD-SLAKE-text (train.json: a list of {id, caption}, id = the image's path under
--image_subdir) -> rocov2_vqarad_slake_train.json (captioning, training only). Run
tools/preprocess_images.py first: the images are read from its output folder, as in the original.

    python tools/convert_rocov2_vqarad_slake_text_to_sharegpt.py   # ./datasets/ROCOv2-VQARAD-SLAKE-text -> ./datasets/medcap
"""

from medcap.data.sources import (
    convert_splits,
    converter_args,
    exit_on_source_error,
    read_rocov2_vqarad_slake_text,
)


def main(argv=None):
    parser = converter_args(__doc__, "./datasets/ROCOv2-VQARAD-SLAKE-text")
    parser.add_argument("--image_subdir", default="images_preprocess", help="image folder inside --data_dir")
    parser.add_argument("--seed", type=int, default=0, help="draw of the training instructions")
    args = parser.parse_args(argv)
    read = lambda _: read_rocov2_vqarad_slake_text(args.data_dir, args.image_subdir, seed=args.seed)  # noqa: E731
    convert_splits("rocov2_vqarad_slake", read, args.output_dir, args.strict, ("train",))


if __name__ == "__main__":
    with exit_on_source_error():
        main()
