"""Nothing lost when a write fails or a folder is wrong, and one line per error: a CSV cut
mid-row is repaired on the rerun, writes that fail under a file size limit (as on a full disk)
name the file and keep what was there, bad folders fail before any model loads, every error
case ends with ``error: ...`` and no traceback, and the TensorBoard logger's files load."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_evaluation import eval_overrides, ws  # noqa: F401 - the evaluation workspace fixture
from test_training import train_args, workspace  # noqa: F401 - the training workspace fixture

from medcap.io import ResumableCSV, atomic_write, read_csv_rows

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, file_limit: int | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``medcap ...`` in a child; ``file_limit`` caps every file it writes (RLIMIT_FSIZE, with
    SIGXFSZ ignored, so a write past it fails with EFBIG as a full disk fails with ENOSPC)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run(
        [sys.executable, "-m", "medcap.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
        preexec_fn=limit if file_limit else None, env={**os.environ, **(env or {})},
    )  # fmt: skip


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = last_line(proc)
    assert line.startswith("error: "), proc.stderr[-3000:]
    return line


# ------------------------------------------------------------------ CSVs
def test_a_row_cut_mid_write_is_dropped_before_the_rerun_appends(tmp_path):
    path = tmp_path / "test_out_slake_x.csv"
    with ResumableCSV(path, ["index", "answer"]) as out:
        for i in range(3):
            out.add({"index": i, "answer": f'answer "{i}", with a comma\nand a newline'})
    whole = path.read_bytes()
    path.write_bytes(whole + b'3,"answer 3, cut')  # the disk filled during row 3
    with ResumableCSV(path, ["index", "answer"]) as out:
        assert sorted(out.done) == [0, 1, 2]
        assert path.read_bytes() == whole  # cut back to the last complete row
        out.add({"index": 3, "answer": "answer 3"})
    rows = read_csv_rows(path)
    assert [r["index"] for r in rows] == ["0", "1", "2", "3"] and rows[3]["answer"] == "answer 3"
    path.write_bytes(path.read_bytes()[:-1])  # cut between the row's \r and \n: the row is whole
    assert [r["index"] for r in read_csv_rows(path)] == ["0", "1", "2", "3"]


def test_evaluation_under_a_file_size_limit_loses_no_row(ws, tmp_path):  # noqa: F811
    common = ["run", "generate", "--config", "custom_generation_config", "test_slake=True",
              f"dataset_source={ws['slake']}", "vqa_mode=direct", "batch_size=1",
              f"vision_checkpoint={ws['ckpt']}/meta_model_0.pt"]  # fmt: skip
    clean = cli(*common, *eval_overrides(ws, tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr[-3000:]
    expected = (tmp_path / "clean" / "test_out_slake_meta_model_0.csv").read_bytes()
    out = tmp_path / "full_disk"
    header = expected.index(b"\r\n") + 2
    limited = cli(*common, *eval_overrides(ws, out), file_limit=header + 60)
    line = one_line_error(limited)
    csv_path = out / "test_out_slake_meta_model_0.csv"
    assert f"error: cannot write {csv_path}: [Errno 27] File too large (disk full?)" in line
    assert line.endswith("rows kept; a rerun resumes")
    assert csv_path.stat().st_size == header + 60  # a cut row is on disk
    rerun = cli(*common, *eval_overrides(ws, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert csv_path.read_bytes() == expected  # no merged rows, none lost


# ------------------------------------------------------------------ checkpoints and folders
def test_a_checkpoint_save_that_fails_keeps_the_previous_state(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    first = cli(*train_args(workspace, out, "epochs=1"))
    assert first.returncode == 0, first.stderr[-3000:]
    state = out / "checkpoint" / "recipe_state.pt"
    before = state.read_bytes()
    # what a SIGKILL mid-save leaves: a zero-byte temporary of a process that is gone
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / "checkpoint" / f".meta_model_1.pt.tmp-{int(gone.stdout)}"
    stale.write_bytes(b"")
    live = out / "checkpoint" / f".meta_model_1.pt.tmp-{os.getpid()}"  # a live process's: left alone
    live.write_bytes(b"")
    limited = cli(*train_args(workspace, out, "epochs=2", "resume_from_checkpoint=True"), file_limit=20_000)
    line = one_line_error(limited)
    target = out / "checkpoint" / "meta_model_1.pt"
    assert line.startswith(f"error: cannot write {target}: ") and "(disk full?)" in line
    assert "nothing was written there" in line
    assert state.read_bytes() == before and not target.exists()
    assert not stale.exists()
    live.unlink()
    assert not [p.name for p in (out / "checkpoint").iterdir() if ".tmp-" in p.name]  # no half files


def test_atomic_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def fails(f):
        f.write(b"new, half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"cannot write .*metrics.json: \[Errno 28\] No space left on device .*the previous file is kept"):
        atomic_write(path, fails)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_an_output_folder_that_cannot_be_made_fails_before_the_model_loads(workspace, tmp_path):  # noqa: F811
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = cli(*train_args(workspace, blocker / "run"))
    line = one_line_error(proc)
    assert line.startswith(f"error: output_dir={blocker / 'run'}: cannot create or write this folder")
    assert "Not a directory" in line and "trainable parameters" not in proc.stdout + proc.stderr


# ------------------------------------------------------------------ one line per error
def evil_file(path: Path) -> Path:
    torch.save({"visual": {}, "projector": {}, "payload": Path("x")}, path)
    return path


def test_errors_end_with_one_line_and_no_traceback(ws, workspace, tmp_path):  # noqa: F811
    gen = ["run", "generate", "--config", "custom_generation_config", "test_slake=True",
           f"dataset_source={ws['slake']}", "vqa_mode=direct"]  # fmt: skip
    # an image that is missing: the file and the record (index and qid)
    proc = cli("run", "generate", "--config", "custom_generation_config",
               *eval_overrides(ws, tmp_path / "a", f"image={tmp_path}/missing.dcm", "prompt=x"))  # fmt: skip
    assert one_line_error(proc) == f"error: {tmp_path}/missing.dcm: image file not found"
    slake = tmp_path / "SLAKE"
    shutil.copytree(ws["slake"], slake)
    (slake / "imgs" / "xmlab1" / "source.jpg").unlink()
    proc = cli(*gen[:5], f"dataset_source={slake}", "vqa_mode=direct", *eval_overrides(ws, tmp_path / "b"))
    assert one_line_error(proc) == f"error: {slake}/imgs/xmlab1/source.jpg (record 1, qid 2): image file not found"
    # a pickled vision checkpoint: what it holds that is not allowed, without colour codes
    proc = cli(*gen, f"vision_checkpoint={evil_file(tmp_path / 'evil.pt')}", *eval_overrides(ws, tmp_path / "c"))
    line = one_line_error(proc)
    assert "evil.pt: refused" in line and "Unsupported global: GLOBAL pathlib.PosixPath" in line
    assert "\x1b" not in proc.stderr
    # a typo in an override
    proc = cli(*gen, "vision_chekpoint=x", *eval_overrides(ws, tmp_path / "d"))
    assert "vision_chekpoint (did you mean vision_checkpoint?)" in one_line_error(proc)
    # a pickled recipe state
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    evil_file(out / "checkpoint" / "recipe_state.pt")
    proc = cli(*train_args(workspace, out, "resume_from_checkpoint=True"))
    assert "recipe_state.pt: refused" in one_line_error(proc)
    # MEDCAP_DEBUG=1 shows the traceback as well
    debug = cli(*gen, "vision_chekpoint=x", *eval_overrides(ws, tmp_path / "e"), env={"MEDCAP_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and last_line(debug).startswith("error: ")


def test_a_pickled_llm_file_is_refused_by_name(ws, tmp_path):  # noqa: F811
    llm = tmp_path / "llm"
    shutil.copytree(ws["llm"], llm)
    state = torch.load(llm / "consolidated.00.pth", weights_only=True)
    state["evil"] = Path("x")
    torch.save(state, llm / "consolidated.00.pth")
    overrides = [o for o in eval_overrides(ws, tmp_path / "out") if not o.startswith("checkpointer.checkpoint_dir")]
    proc = cli("run", "generate", "--config", "custom_generation_config", "test_slake=True",
               f"dataset_source={ws['slake']}", f"checkpointer.checkpoint_dir={llm}", *overrides)  # fmt: skip
    line = one_line_error(proc)
    # the file, not the folder: with several shards the user must know which one holds the pickle
    assert f"LLM checkpoint file {llm / 'consolidated.00.pth'}: refused" in line and "pathlib.PosixPath" in line


def test_tensorboard_logger_writes_the_loss_curve(workspace, tmp_path):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    proc = cli(*train_args(workspace, out, "epochs=2", "batch_size=4",
                           "metric_logger._component_=torchtune.training.metric_logging.TensorBoardLogger",
                           f"metric_logger.log_dir={out}/tensorboard"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    from tensorboard.util.tensor_util import make_ndarray

    losses = acc.Tensors("loss")  # torchtune writes new-style scalars (tensor summaries)
    assert [e.step for e in losses] == [1, 2, 3, 4]
    assert all(float(make_ndarray(e.tensor_proto)) > 0 for e in losses)
