"""The README's main job (`make demo`), end to end on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import open_clip
import pytest
import torch


@pytest.mark.slow
def test_smoke_main_job(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "medcap.demo.smoke", "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["llm_bitwise_unchanged"] is True
    assert summary["loss_last"] < 0.5 * summary["loss_first"]
    assert summary["answer_token_accuracy_after"] > summary["answer_token_accuracy_before"] + 0.5
    assert summary["answer_token_accuracy_reloaded"] == summary["answer_token_accuracy_after"]
    ckpt = torch.load(summary["vision_checkpoint"], weights_only=True)
    assert set(ckpt) == {"visual", "projector", "medcap"}
    open_clip.create_model(f"local-dir:{summary['exported_encoder']}")  # builds offline
