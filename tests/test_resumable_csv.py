"""An evaluation CSV cut by a failed write (a full disk) anywhere, even inside a quoted answer
that holds line breaks, resumes to exactly the file an uninterrupted run writes: the rerun cuts
the file back to the end of its last complete record, and never reads a cut record as whole."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medcap.io import ResumableCSV, complete_length, read_complete_rows, read_csv_rows

COLUMNS = ["index", "question", "generated"]
# what real model output holds: line breaks of every kind, quotes, commas, non-ASCII, and the
# characters str.splitlines breaks at that csv leaves unquoted
NASTY = [
    "Yes",
    "line one\nline two",
    "windows\r\nline",
    'he said "no", then\r\n"yes"',
    "a, b, and c",
    "trailing newline\n",
    "\n",
    '"',
    "",
    "café, 中文, émoji 🩻",
    "bare\rreturn",
    "sep\u2028arator\x0cform\x1cfeed",
    '""\n""',
]


def rows_for(answers: list[str]) -> list[dict[str, str]]:
    return [{"index": str(i), "question": f"q{i}, \"quoted\"", "generated": a} for i, a in enumerate(answers)]


def write_all(path: Path, rows: list[dict[str, str]]) -> None:
    with ResumableCSV(path, COLUMNS) as out:
        for row in rows:
            if int(row["index"]) not in out.done:
                out.add(row)


def resume_from(path: Path, cut: bytes, rows: list[dict[str, str]]) -> bytes:
    path.write_bytes(cut)
    write_all(path, rows)
    return path.read_bytes()


def test_every_cut_of_the_last_row_resumes_to_the_uninterrupted_file(tmp_path):
    rows = rows_for(NASTY)
    whole_path = tmp_path / "whole.csv"
    write_all(whole_path, rows)
    whole = whole_path.read_bytes()
    assert read_csv_rows(whole_path) == rows  # the answers round-trip, line breaks and all
    last_start = len(whole) - len(whole_path.read_bytes().split(b"\r\n12,")[1]) - len(b"12,")
    assert whole[last_start:].startswith(b"12,")
    path = tmp_path / "cut.csv"
    for cut in range(last_start, len(whole) + 1):
        path.write_bytes(whole[:cut])
        end, records = complete_length(path)
        complete = cut == len(whole)
        assert end == (len(whole) if complete else last_start), cut
        assert records == (13 if complete else 12), cut
        assert [r["index"] for r in read_complete_rows(path)] == [str(i) for i in range(records)], cut
        assert resume_from(path, whole[:cut], rows) == whole, f"cut at byte {cut} of {len(whole)}"


def test_a_cut_just_after_a_line_break_inside_an_answer_is_not_a_record(tmp_path):
    """The reported loss: the cut record's text ends in the newline inside its quotes, which
    Python's csv reader yields as a complete record at the end of the input."""
    rows = rows_for(["first", "answer with\na line break"])
    path = tmp_path / "out.csv"
    write_all(path, rows)
    whole = path.read_bytes()
    cut = whole[: whole.index(b"with\n") + len(b"with\n")]
    path.write_bytes(cut)
    assert complete_length(path) == (whole.index(b"1,"), 1)
    assert resume_from(path, cut, rows) == whole
    assert len(read_csv_rows(path)) == 2


@st.composite
def interrupted_runs(draw):
    text = st.text(
        alphabet=st.one_of(st.sampled_from('\n\r",; \u2028\x0c'), st.characters(exclude_categories=["Cs"])),
        max_size=40,
    )
    answers = draw(st.lists(text, min_size=1, max_size=8))
    # where a full disk cuts: anywhere, or (as often) just after a line break or a quote, where
    # a record looks finished to a reader that does not track quotes
    cut_fraction = draw(st.floats(min_value=0.0, max_value=1.0))
    after_special = draw(st.booleans())
    return answers, cut_fraction, after_special


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(interrupted_runs())
def test_random_answers_cut_at_random_offsets_resume_to_the_uninterrupted_file(tmp_path, run):
    answers, cut_fraction, after_special = run
    rows = rows_for(answers)
    whole_path = tmp_path / "whole.csv"
    whole_path.unlink(missing_ok=True)
    write_all(whole_path, rows)
    whole = whole_path.read_bytes()
    offsets = [i + 1 for i, b in enumerate(whole) if b in b'\r\n"'] if after_special else range(len(whole) + 1)
    cut = offsets[min(int(cut_fraction * len(offsets)), len(offsets) - 1)]
    path = tmp_path / "cut.csv"
    assert resume_from(path, whole[:cut], rows) == whole
    assert read_csv_rows(path) == rows


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_files_written_elsewhere_with_either_line_ending_keep_every_row(tmp_path, ending):
    """CSVs from other tools (the original's, a spreadsheet's) may end rows in \\n alone."""
    path = tmp_path / "other.csv"
    body = ending.join([b"index,generated", b'0,"two' + ending + b'lines"', b"1,plain", b""])
    path.write_bytes(body)
    assert complete_length(path) == (len(body), 2)
    path.write_bytes(body + b'2,"cut' + ending)
    assert complete_length(path) == (len(body), 2)
