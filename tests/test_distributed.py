"""torch.distributed: real 2-process runs on the CPU with gloo (DDP and FSDP2), compared with one process
that computes the same micro-batches, and the failure cases: a rank that dies, a NaN on one rank."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

import mpdiag
from mpdiag.core.run import Kind
from mpdiag.core.stats import TensorStats
from mpdiag.record._accumulate import tensor_stats

WORLD = 2
STEPS = 2
FORMATS = ("fp16", "bf16", "fp8_e4m3")

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


def fully_shard_fn():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard  # torch 2.4, 2.5
        except ImportError:
            return None
    return fully_shard


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))  # 3 rows: shards of uneven size


def batches() -> list[torch.Tensor]:
    """The global batch of each step; rank r trains on rows [4r, 4r + 4)."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD * 4, 6, generator=generator) for _ in range(STEPS)]


def chunk(batch: torch.Tensor, rank: int) -> torch.Tensor:
    return batch[4 * rank : 4 * rank + 4]


def wrap(model: nn.Module, how: str) -> nn.Module:
    if how == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    fully_shard = fully_shard_fn()
    fully_shard(model[0])
    fully_shard(model)
    return model


def train(how: str, rank: int, data: list[torch.Tensor], out: Path | None, nan_at: tuple[int, int] | None = None):
    """STEPS steps of SGD on this rank's rows, diagnosed when ``out`` is given; returns (diag, params)."""
    model = wrap(make_model(), how)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diag = None
    if out is not None:
        diag = mpdiag.diagnose(model, formats=FORMATS, optimizer=opt, run_file=out / f"{how}.mpdiag")
    for step, batch in enumerate(data):
        x = chunk(batch, rank).clone()
        if nan_at == (step, rank):
            x[0, 0] = float("nan")
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    if diag is not None:
        diag.close()
    params = {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()
    }
    return diag, params


def worker(rank: int, port: int, scenario: str, out: str) -> None:
    out_dir = Path(out)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
    try:
        result = run_scenario(scenario, rank, out_dir)
    except BaseException:
        result = {"error": traceback.format_exc()}
    finally:
        if scenario != "rank_dies":
            torch.distributed.destroy_process_group()
    (out_dir / f"{scenario}-{rank}.pkl").write_bytes(pickle.dumps(result))


def run_scenario(scenario: str, rank: int, out: Path) -> dict:
    data = batches()
    if scenario in ("ddp", "fsdp2"):
        diag, with_mpdiag = train(scenario, rank, data, out)
        _, without = train(scenario, rank, data, None)
        unchanged = all(torch.equal(with_mpdiag[n], without[n]) for n in without)
        report = diag.report(out / f"report-{scenario}-{rank}")
        return {"run": diag.run, "unchanged": unchanged, "report": report is not None}
    if scenario == "nan":
        diag, _ = train("ddp", rank, data, out, nan_at=(1, 1))
        return {"run": diag.run}
    if scenario == "uneven":  # a module only rank 1 runs: its site must reach rank 0 too
        model = nn.ModuleDict({"body": nn.Linear(6, 6), "extra": nn.Linear(6, 6)})
        with mpdiag.diagnose(model) as diag:
            x = chunk(data[0], rank)
            y = model["body"](x)
            if rank == 1:
                y = model["extra"](y)
            y.sum().backward()
        return {"run": diag.run, "extra": tensor_stats(y.detach(), mpdiag.core.stats.DEFAULT_FORMATS) if rank else None}
    if scenario == "rank_dies":
        model = nn.parallel.DistributedDataParallel(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            with mpdiag.diagnose(model, optimizer=opt, run_file=out / "dies.mpdiag"):
                for step, batch in enumerate(data):
                    if rank == 1 and step == 1:
                        os._exit(3)  # dies without a word, mid-run
                    opt.zero_grad()
                    model(chunk(batch, rank)).pow(2).mean().backward()
                    opt.step()
        except Exception as error:  # the survivor's collective fails: that is the expected outcome
            # torch.distributed's own error (gloo's RuntimeError), not one of mpdiag's or a bug's
            return {
                "raised": type(error).__name__,
                "collective": isinstance(error, RuntimeError) and not isinstance(error, mpdiag.MpdiagError),
            }
        return {"raised": None}
    raise ValueError(scenario)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, timeout: float = 150) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [context.Process(target=worker, args=(rank, port, scenario, str(out))) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"{scenario}: a rank was still running after {timeout} s"
    results = []
    for rank in range(WORLD):
        path = out / f"{scenario}-{rank}.pkl"
        results.append(pickle.loads(path.read_bytes()) if path.exists() else {"exitcode": procs[rank].exitcode})
    for r in results:
        assert "error" not in r, r["error"]
    return results


def reference(how: str) -> tuple[mpdiag.Run, dict[int, dict[str, TensorStats]]]:
    """One process, the same micro-batches one after the other (gradient accumulation), gradients
    averaged as DDP and FSDP average them: the run the distributed one must equal."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads: dict[int, dict[str, TensorStats]] = {}
    with mpdiag.diagnose(model, formats=FORMATS, optimizer=opt) as diag:
        for step, batch in enumerate(batches()):
            opt.zero_grad()
            for rank in range(WORLD):
                model(chunk(batch, rank)).pow(2).mean().backward()
            for p in model.parameters():
                p.grad /= WORLD  # exact: a power of two
            grads[step] = {n: tensor_stats(p.grad, FORMATS) for n, p in model.named_parameters()}
            opt.step()
    return diag.run, grads


@pytest.mark.parametrize("how", ["ddp", "fsdp2"])
def test_the_reduced_statistics_equal_one_process_on_all_the_data(how: str, tmp_path: Path) -> None:
    if how == "fsdp2" and fully_shard_fn() is None:
        pytest.skip("this torch has no FSDP2 fully_shard")
    results = launch(how, tmp_path)
    expected, grads = reference(how)
    runs = [r["run"] for r in results]
    assert runs[0].sites and set(runs[0].sites) == set(runs[1].sites) == set(expected.sites)  # the user's names
    for step in expected.steps:
        for site in expected.sites:
            want = grads[step][site.name] if site.kind == Kind.PARAM_GRAD else expected.records[step][site]
            for rank, run in enumerate(runs):
                assert run.records[step][site] == want, (how, rank, step, site)
    # what each step did to each parameter: FSDP's shards are counted whole, DDP's replicas once
    assert expected.updates and all(run.updates == expected.updates for run in runs)
    assert all(r["unchanged"] for r in results)  # training is bit for bit the same with mpdiag attached
    written = mpdiag.load(tmp_path / f"{how}.mpdiag")
    assert (written.records, written.updates) == (runs[0].records, runs[0].updates)  # rank 0 wrote the file...
    assert [r["report"] for r in results] == [True, False]  # ...and the report; rank 1 wrote nothing
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [f"report-{how}-0"]
    assert runs[0].meta["environment"]["distributed"] == {"world_size": 2, "backend": "gloo"}


def test_nan_on_one_rank_is_traced_to_that_rank(tmp_path: Path) -> None:
    runs = [r["run"] for r in launch("nan", tmp_path)]
    first = runs[0].first_nonfinite()
    assert (first.step, first.phase, first.name, first.ranks, first.produced) == (1, "forward", "0", (1,), True)
    assert "rank 1" in str(first)
    assert runs[1].first_nonfinite() == first
    assert mpdiag.load(tmp_path / "ddp.mpdiag").first_nonfinite() == first  # ranks survive the run file
    grads = [e for e in runs[0].nonfinite_events() if e.kind == "param_grad" and e.step == 1]
    # DDP averaged the NaN into every rank's gradients: seen on both, counted once (they are the same).
    assert grads and all(e.ranks == (0, 1) for e in grads)
    assert {e.name: e.nans for e in grads} == {
        n: runs[0].stats(n, "param_grad", 1).nans for n in {e.name for e in grads}
    }


def test_a_site_only_one_rank_saw_reaches_every_rank(tmp_path: Path) -> None:
    results = launch("uneven", tmp_path)
    extra = mpdiag.Site("extra", Kind.ACTIVATION)
    for r in results:
        stats = r["run"].records[0][extra]
        assert stats.calls == 1 and stats == results[1]["extra"]
    body = [r["run"].records[0][mpdiag.Site("body", Kind.ACTIVATION)] for r in results]
    assert body[0] == body[1] and body[0].numel == 2 * 4 * 6 and body[0].calls == 2


def test_a_rank_that_dies_does_not_hang_the_others_or_spoil_the_run_file(tmp_path: Path) -> None:
    survivor, dead = launch("rank_dies", tmp_path)
    assert survivor["raised"] is not None and survivor["collective"], survivor
    assert dead == {"exitcode": 3}
    run = mpdiag.load(tmp_path / "dies.mpdiag")
    assert run.steps == [0]  # the step both ranks closed, and nothing half-written after it


def test_without_a_process_group_everything_is_single_process() -> None:
    from mpdiag.core.errors import AttachError
    from mpdiag.record import distributed

    assert distributed.active_group(None) is None and distributed.rank_of(None) == 0
    with pytest.raises(AttachError, match="no torch.distributed process group is initialised"):
        mpdiag.diagnose(nn.Linear(2, 2), group=object())


def test_wrapper_levels_leave_the_names_and_flattened_parameters_are_refused() -> None:
    from mpdiag.core.errors import AttachError
    from mpdiag.record.distributed import clean_name, unwrap

    assert clean_name("layers.0._fsdp_wrapped_module.attn") == "layers.0.attn"
    assert clean_name("_orig_mod.encoder._checkpoint_wrapped_module.ffn.weight") == "encoder.ffn.weight"
    assert (
        clean_name("_fsdp_wrapped_module") == ""
        and clean_name("my_fsdp_wrapped_module_x") == "my_fsdp_wrapped_module_x"
    )
    flat = nn.Module()
    flat.register_parameter("_flat_param", nn.Parameter(torch.zeros(3)))  # what FSDP1 without use_orig_params holds
    with pytest.raises(AttachError, match="use_orig_params=True"):
        unwrap(flat)
    plain = nn.Linear(2, 2)
    assert unwrap(plain) == (plain, False)
