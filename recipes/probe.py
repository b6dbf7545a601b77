"""Linear and kNN probes of frozen image features: does an encoder trained against a frozen LLM
give better features than random initialisation of the same architecture, or raw pixels?

    medcap run probe --config probe labels=./datasets/SLAKE label_kind=Modality \
        vision=biomedclip vision_checkpoint='RUN/checkpoint/meta_model_*.pt' output_dir=./probe_out

Writes output_dir/probe.json, probe.csv, probe_fewshot.csv and probe.png. The work is in
``medcap.probing``; the demo calls ``medcap.probing.run_probe`` directly.
"""

import sys

from omegaconf import DictConfig, OmegaConf
from torchtune import config

from medcap.errors import run_main
from medcap.io import ensure_writable
from medcap.probing import ProbeSettings, encoder_specs, extract_all, fit_all, read_labelled_set, write_report


def encoder_entries(settings: ProbeSettings) -> list:
    """The top-level encoders (vision + vision_checkpoint: a file, a glob or a list; or
    vision + vision_path), then those listed under ``encoders``."""
    plain = lambda v: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v  # noqa: E731
    checkpoints = plain(settings.vision_checkpoint) or []
    checkpoints = checkpoints if isinstance(checkpoints, list) else [checkpoints]
    entries = [{"vision": settings.vision, "vision_checkpoint": c} for c in checkpoints]
    if settings.vision_path:
        entries.append({"vision": settings.vision, "vision_path": settings.vision_path})
    return entries + list(plain(settings.encoders) or [])


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    settings = ProbeSettings.from_config(cfg, "probe")
    ensure_writable([("output_dir", settings.output_dir)])
    # set-up: the labelled set (split and checked), the encoders (baselines added)
    if not settings.labels:
        raise SystemExit(
            "probe: labels=FILE_OR_FOLDER is required (a CSV, a folder per class, or a SLAKE/VQA-RAD root)"
        )
    lset = read_labelled_set(str(settings.labels), settings)
    summary = lset.summary()
    print(
        f"labels: {summary['n_train']} training and {summary['n_test']} test images, classes {lset.classes}"
    )
    specs = encoder_specs(encoder_entries(settings), settings.vision, settings.pixel_size)
    print("encoders: " + ", ".join(f"{s.name} ({s.kind})" for s in specs))

    # extract: pooled features, cached by encoder and image content
    features = extract_all(specs, lset, settings, settings.output_dir)

    # fit: logistic regression (C by grouped CV on train), cosine kNN, few-shot draws; score on test
    result = fit_all(features, lset, settings)

    # report: probe.json, probe.csv, probe_fewshot.csv, probe.png
    files = write_report(result, settings.output_dir, figure=settings.figure)
    for name, res in result["results"].items():
        line = "  ".join(f"{clf} {r['balanced_accuracy']['value']:.3f}" for clf, r in res.items())
        print(f"{name:32s} balanced accuracy: {line}")
    print(f"wrote {', '.join(str(p) for p in files.values())}")


if __name__ == "__main__":
    sys.exit(run_main(recipe_main))
