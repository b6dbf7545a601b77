"""The probe's settings (``recipes/configs/probe.yaml``'s keys), on the recipes' shared base."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medcap.probing.features import check_feature_kind
from medcap.settings import RecipeSettings


@dataclass(frozen=True)
class ProbeSettings(RecipeSettings):
    """Every knob of a probe; the names are the keys of ``recipes/configs/probe.yaml``."""

    # what to probe (the recipe's inputs; ``run_probe`` takes them as arguments)
    labels: Any = None  # a CSV, a folder per class, or a SLAKE / VQA-RAD root
    output_dir: str | None = None
    vision_checkpoint: Any = None  # a file, a glob or a list
    vision_path: str | None = None  # an open_clip folder
    encoders: Any = None  # more entries (see probing.encoders.parse_entry)

    label_kind: str | None = None  # SLAKE content_type / VQA-RAD question_type
    label_question: str | None = None  # regex picking the question whose answer is the label
    image_column: str = "image"
    label_column: str = "label"
    split_column: str = "split"
    group_column: str = "group"
    test_fraction: float = 0.25
    unseen_test_classes: str = "refuse"  # a test class with no training image: refuse, or drop its images
    vision: str = "biomedclip"  # architecture of checkpoints that do not name theirs
    device: str = "cpu"
    dtype: str = "fp32"  # the encoders' forward pass (features are kept in fp32)
    features: str = "pooled"  # pooled (the embedding) or patches (patch tokens, flattened: what patch connectors read)
    batch_size: int = 32
    num_workers: int = 0
    cache: bool = True
    cache_dir: str | None = None  # None: OUTPUT_DIR/feature_cache
    seed: int | None = 0
    cv_folds: int = 5
    logreg_Cs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
    logreg_max_iter: int = 1000
    knn_k: int = 5
    fewshot_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    fewshot_draws: int = 5
    fewshot_C: float = 1.0
    blas_threads: int | None = 1  # BLAS/OpenMP threads for the fits (None: the libraries' default)
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    pixel_size: int = 16
    figure: bool = True
    progress: bool = True

    def check(self) -> None:
        super().check()
        check_feature_kind(self.features)
