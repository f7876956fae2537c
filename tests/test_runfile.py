"""Run files: round trip, reading while written, surviving SIGKILL, clear errors for bad files."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import mpdiag
from mpdiag.io.runfile import SCHEMA_VERSION, RunFileError
from mpdiag.toy import TinyTransformerLM, lm_loss, synthetic_batches


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyTransformerLM(vocab_size=32, d_model=16, n_heads=2, n_layers=1, seq_len=8)


def test_load_gives_the_same_run_site_by_site(tmp_path: Path) -> None:
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = synthetic_batches(batch_size=2, seq_len=8, vocab_size=32)
    with mpdiag.diagnose(model, optimizer=opt, run_file=tmp_path / "run.mpdiag", every=2) as diag:
        for _ in range(5):
            tokens, targets = next(batches)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = lm_loss(model(tokens), targets)
            (loss * 1e30 if _ == 4 else loss).backward()  # the last step overflows to inf somewhere
            opt.step()
    live, loaded = diag.run, mpdiag.load(tmp_path / "run.mpdiag")
    assert loaded.steps == live.steps == [0, 2, 4]
    assert loaded.sites == live.sites
    for step in live.steps:
        for site in live.sites:
            if site in live.records[step]:
                assert loaded.stats(site.name, site.kind, step) == live.stats(site.name, site.kind, step)
    assert loaded.nonfinite_events() == live.nonfinite_events()
    assert loaded.meta == json.loads(json.dumps(live.meta))
    env = loaded.meta["environment"]
    assert env["torch"] == torch.__version__ and env["autocast_dtype"] == "bfloat16"
    assert env["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert env["formats"] == list(live.formats) and "cudnn_allow_tf32" in env and "anomaly_mode" in env


def test_a_reader_loads_the_file_while_training_writes_it(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    path = tmp_path / "live.mpdiag"
    with mpdiag.diagnose(model, run_file=path) as diag:
        for step in range(4):
            model(torch.randn(2, 4)).sum().backward()
            diag.step()
            assert mpdiag.load(path).steps == list(range(step + 1))


@pytest.mark.parametrize("folder", ["runs", "runs #1?%20"], ids=["plain", "uri-characters"])
def test_closing_the_writer_and_loading_leave_no_file_beside_the_run_file(tmp_path: Path, folder: str) -> None:
    directory = tmp_path / folder
    directory.mkdir()
    path = directory / "run.mpdiag"
    model = nn.Linear(4, 2)
    with mpdiag.diagnose(model, run_file=path) as diag:
        model(torch.randn(2, 4)).sum().backward()
        diag.step()
        assert {p.name for p in directory.iterdir()} == {"run.mpdiag", "run.mpdiag-wal", "run.mpdiag-shm"}
        assert mpdiag.load(path).steps == [0]  # read through the live writer's WAL
    assert [p.name for p in directory.iterdir()] == ["run.mpdiag"]
    for _ in range(2):
        assert mpdiag.load(path).records == diag.run.records
        assert [p.name for p in directory.iterdir()] == ["run.mpdiag"]


def test_an_empty_file_is_said_to_be_empty(tmp_path: Path) -> None:
    empty = tmp_path / "run.mpdiag"
    empty.touch()
    with pytest.raises(RunFileError, match=r"run.mpdiag is empty \(0 bytes\)"):
        mpdiag.load(empty)


def test_a_killed_process_leaves_every_committed_step(tmp_path: Path) -> None:
    path = tmp_path / "killed.mpdiag"
    script = textwrap.dedent(f"""
        import sys, torch, mpdiag
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        diag = mpdiag.diagnose(model, run_file={str(path)!r})
        step = 0
        while True:
            model(torch.randn(4, 8)).sum().backward()
            diag.step()
            print(step, flush=True)
            step += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    committed = []
    try:
        while len(committed) < 5:  # each line is a step the process has closed (no clock involved)
            line = proc.stdout.readline()
            assert line, f"the training process ended after {len(committed)} steps, before it was killed"
            committed.append(int(line))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and len(committed) == 5
    run = mpdiag.load(path)
    assert set(committed) <= set(run.steps)  # a step after the last print may be there too
    assert run.stats("0", "activation", committed[-1]).numel == 32


def make_run_file(path: Path) -> None:
    model = nn.Linear(2, 2)
    with mpdiag.diagnose(model, run_file=path) as diag:
        for _ in range(20):
            model(torch.randn(64, 2)).sum().backward()
            diag.step()


def test_bad_files_get_clear_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)
    with pytest.raises(RunFileError, match="not a readable mpdiag run file"):
        mpdiag.load(text)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(RunFileError, match="not an mpdiag run file"):
        mpdiag.load(other)
    with pytest.raises(RunFileError, match="no run file"):
        mpdiag.load(tmp_path / "missing.mpdiag")
    newer = tmp_path / "newer.mpdiag"
    make_run_file(newer)
    with sqlite3.connect(newer) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(RunFileError, match="upgrade mpdiag"):
        mpdiag.load(newer)


def test_files_of_schema_version_1_still_load(tmp_path: Path) -> None:
    path = tmp_path / "v1.mpdiag"
    model = nn.Sequential(nn.Linear(2, 2))
    with mpdiag.diagnose(model, run_file=path) as diag:
        model(torch.tensor([[float("nan"), 1.0]])).sum().backward()
    with sqlite3.connect(path) as db:  # as version 1 wrote it: events without their ranks
        db.execute("ALTER TABLE events RENAME TO events_v2")
        db.execute(
            "CREATE TABLE events (step INTEGER, seq INTEGER, name TEXT, kind TEXT, phase TEXT, "
            "nans INTEGER, posinf INTEGER, neginf INTEGER, produced INTEGER)"
        )
        db.execute(
            "INSERT INTO events SELECT step, seq, name, kind, phase, nans, posinf, neginf, produced FROM events_v2"
        )
        db.execute("DROP TABLE events_v2")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    run = mpdiag.load(path)
    assert run.nonfinite_events() == diag.run.nonfinite_events() and run.first_nonfinite().ranks == ()


def test_files_of_schema_version_2_still_load(tmp_path: Path) -> None:
    """Version 2 laid the stats columns out in its own order (calls and dtypes before the histogram)."""
    path = tmp_path / "v2.mpdiag"
    model = nn.Sequential(nn.Linear(2, 2))
    with mpdiag.diagnose(model, run_file=path) as diag:
        model(torch.tensor([[3e5, 1e-9]])).sum().backward()
    v2_columns = "numel, zeros, nans, posinf, neginf, amax, amin_nonzero, calls, dtypes, hist_first, hist, casts"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE stats_v2 (step INTEGER NOT NULL, site INTEGER NOT NULL REFERENCES sites (id), "
            "numel INTEGER, zeros INTEGER, nans INTEGER, posinf INTEGER, neginf INTEGER, amax REAL, "
            "amin_nonzero REAL, calls INTEGER, dtypes TEXT, hist_first INTEGER, hist BLOB, casts BLOB, "
            "PRIMARY KEY (step, site))"
        )
        db.execute(f"INSERT INTO stats_v2 SELECT step, site, {v2_columns} FROM stats")
        db.execute("DROP TABLE stats")
        db.execute("ALTER TABLE stats_v2 RENAME TO stats")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        assert [row[1] for row in db.execute("PRAGMA table_info(stats)")][9:11] == ["calls", "dtypes"]
    assert mpdiag.load(path).records == diag.run.records


def test_a_truncated_file_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "run.mpdiag"
    make_run_file(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.mpdiag"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunFileError, match="not a readable mpdiag run file .*damaged, truncated"):
        mpdiag.load(truncated)


def test_paths_that_cannot_be_written(tmp_path: Path) -> None:
    with pytest.raises(RunFileError, match="cannot create run file"):
        mpdiag.diagnose(nn.Linear(2, 2), run_file=tmp_path / "no" / "such" / "dir" / "run.mpdiag")
    existing = tmp_path / "exists.mpdiag"
    existing.write_text("")
    with pytest.raises(RunFileError, match="already exists"):
        mpdiag.diagnose(nn.Linear(2, 2), run_file=existing)
    model = nn.Linear(2, 2)
    with pytest.raises(RunFileError, match="already exists; choose a new path"):
        mpdiag.diagnose(model, run_file=tmp_path)  # a directory
    mpdiag.diagnose(model).close()  # a failed attach leaves the model free
    with mpdiag.diagnose(model):
        with pytest.raises(mpdiag.MpdiagError, match="already being diagnosed"):
            mpdiag.diagnose(model, run_file=tmp_path / "second.mpdiag")
    assert not (tmp_path / "second.mpdiag").exists()
