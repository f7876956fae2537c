"""The trainer callbacks under DDP, as their users launch it: two CPU processes (gloo), the transformers
Trainer under torchrun and Lightning's ddp strategy. Every rank records the whole job's statistics
(activations summed over ranks, parameters every rank holds alike counted once) and only rank 0 writes."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mpdiag

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="needs torch.distributed with the gloo backend",
    ),
]
SCRIPT = Path(__file__).with_name("ddp_trainers.py")
WORLD = 2


def launch(command: list[str], out: Path) -> list[dict]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=out)
    assert done.returncode == 0, done.stderr[-4000:]
    return [pickle.loads((out / f"rank{rank}.pkl").read_bytes()) for rank in range(WORLD)]


def check_the_job_was_recorded_once(results: list[dict], out: Path, steps: list[int], param: str, site: str) -> None:
    first, second = (r["run"] for r in results)
    assert first.steps == second.steps == steps
    assert all(first.records[s] == second.records[s] for s in steps)  # every rank has the whole job's statistics
    assert first.meta["environment"]["distributed"]["world_size"] == WORLD
    for step in steps:
        assert first.stats(site, "activation", step=step).calls == WORLD  # each rank's micro-batch, summed
    weight = first.stats(param, "param", step=steps[0])
    assert weight.calls == 1  # held alike by every rank: counted once, not summed
    assert mpdiag.load(out / "run.mpdiag").steps == steps  # both ranks were given the path: rank 0 wrote it
    assert len(list((out / "tb").iterdir())) == 1  # one event file: rank 0's


def test_the_transformers_trainer_under_torchrun(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), str(SCRIPT)]
    results = launch([*command, "transformers", str(tmp_path)], tmp_path)
    assert all(r["ddp"] for r in results)  # the Trainer wrapped the model in DistributedDataParallel
    check_the_job_was_recorded_once(
        results, tmp_path, [1, 2, 3], "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc"
    )
    assert results[0]["run"].stats("transformer.h.0.mlp.c_fc.weight", "param").numel == 3 * 16 * 64


def test_lightnings_ddp_strategy(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    results = launch([sys.executable, str(SCRIPT), "lightning", str(tmp_path)], tmp_path)
    check_the_job_was_recorded_once(results, tmp_path, [0, 1, 2], "net.0.weight", "net.0")
    run = results[0]["run"]
    assert run.stats("net.0.weight", "param", step=0).numel == 16 * 6
    assert {s.name for s in run.sites} >= {"net.0", "net.0.weight"}  # Lightning's wrapper level left out of names
