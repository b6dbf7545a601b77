"""Linear and kNN probes of frozen image features: does an encoder trained against a frozen LLM
give better features than random initialisation of the same architecture, or raw pixels?

    medcap run probe --config probe labels=./datasets/SLAKE label_kind=Modality \
        vision=biomedclip vision_checkpoint='RUN/checkpoint/meta_model_*.pt' output_dir=./probe_out

Writes output_dir/probe.json, probe.csv, probe_fewshot.csv and probe.png. The work is in
``medcap.probing``; the demo calls ``medcap.probing.run_probe`` directly.
"""

import sys
from dataclasses import fields

from omegaconf import DictConfig, OmegaConf
from torchtune import config

from medcap.errors import run_main
from medcap.io import ensure_writable
from medcap.probing import ProbeSettings, encoder_specs, extract_all, fit_all, read_labelled_set, write_report
from medcap.recipe_keys import check_keys

KEYS = {f.name for f in fields(ProbeSettings)} | {"labels", "output_dir", "vision_checkpoint", "vision_path", "encoders"}


def encoder_entries(cfg: DictConfig) -> list:
    """The top-level encoders (vision + vision_checkpoint: a file, a glob or a list; or
    vision + vision_path), then those listed under ``encoders``."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    checkpoints = plain.get("vision_checkpoint") or []
    checkpoints = checkpoints if isinstance(checkpoints, list) else [checkpoints]
    entries = [{"vision": plain["vision"], "vision_checkpoint": c} for c in checkpoints]
    if plain.get("vision_path"):
        entries.append({"vision": plain["vision"], "vision_path": plain["vision_path"]})
    return entries + list(plain.get("encoders") or [])


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    check_keys(cfg, KEYS, "probe")
    ensure_writable([("output_dir", cfg.get("output_dir"))])
    # set-up: the labelled set (split and checked), the encoders (baselines added)
    if not cfg.get("labels"):
        raise SystemExit(
            "probe: labels=FILE_OR_FOLDER is required (a CSV, a folder per class, or a SLAKE/VQA-RAD root)"
        )
    settings = ProbeSettings.from_config(cfg)
    lset = read_labelled_set(cfg.labels, settings)
    summary = lset.summary()
    print(
        f"labels: {summary['n_train']} training and {summary['n_test']} test images, classes {lset.classes}"
    )
    specs = encoder_specs(encoder_entries(cfg), settings.vision, settings.pixel_size)
    print("encoders: " + ", ".join(f"{s.name} ({s.kind})" for s in specs))

    # extract: pooled features, cached by encoder and image content
    features = extract_all(specs, lset, settings, cfg.output_dir)

    # fit: logistic regression (C by grouped CV on train), cosine kNN, few-shot draws; score on test
    result = fit_all(features, lset, settings)

    # report: probe.json, probe.csv, probe_fewshot.csv, probe.png
    files = write_report(result, cfg.output_dir, figure=settings.figure)
    for name, res in result["results"].items():
        line = "  ".join(f"{clf} {r['balanced_accuracy']['value']:.3f}" for clf, r in res.items())
        print(f"{name:32s} balanced accuracy: {line}")
    print(f"wrote {', '.join(str(p) for p in files.values())}")


if __name__ == "__main__":
    sys.exit(run_main(recipe_main))
