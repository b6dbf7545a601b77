"""Does an encoder trained against a frozen LLM give better image features? Linear and kNN probes
of frozen features (pooled, or patch tokens) on a labelled image set, against random initialisation of the same
architecture and a pixel baseline.

    from medcap.probing import run_probe
    result = run_probe(["run/checkpoint/meta_model_*.pt"], "SLAKE", "probe_out",
                       label_kind="Modality", vision="vit_tiny")
    result["results"]["meta_model_4"]["logreg"]["balanced_accuracy"]  # {"value", "ci_low", "ci_high"}

The stages (``read_labels``, ``encoder_specs``, ``extract_all``, ``fit_all``, ``write_report``)
are public so ``recipes/probe.py`` reads as they run.
"""

from medcap.probing.classifiers import METRICS
from medcap.probing.encoders import EncoderSpec, encoder_specs, load_encoder
from medcap.probing.features import Features, extract_features
from medcap.probing.labels import LabelledImage, LabelledSet, read_labels
from medcap.probing.pipeline import extract_all, fit_all, read_labelled_set, run_probe
from medcap.probing.report import write_report
from medcap.probing.settings import ProbeSettings

__all__ = [
    "METRICS",
    "EncoderSpec",
    "Features",
    "LabelledImage",
    "LabelledSet",
    "ProbeSettings",
    "encoder_specs",
    "extract_all",
    "extract_features",
    "fit_all",
    "load_encoder",
    "read_labelled_set",
    "read_labels",
    "run_probe",
    "write_report",
]
