"""Blockwise distillation: training one candidate, resumable job runs, checkpoints, seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from archnet.blocks import BlockSpec, find_blocks
from archnet.candidates import build_candidate
from archnet.distill.blockwise import (
    BlockwiseConfig,
    CandidateJob,
    evaluate_nmse,
    load_candidate,
    run_jobs,
    steps_per_job,
    train_block,
)
from archnet.features import FeatureCache
from archnet.zoo import create_model

SPEC = BlockSpec("blocks.0", (8, 8, 8), (8, 8, 8))


def _regression_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and outputs of a fixed random residual conv block (the 'teacher')."""
    torch.manual_seed(1234)  # the same block for every call
    block = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()
    x = torch.randn(n, 8, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        f = block(x)
        y = x + f / f.std()
    return x.numpy(), y.numpy()


def _fresh_candidate(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_candidate("mbconv_k3_e3_relu", SPEC)


def test_train_block_lowers_nmse() -> None:
    x, y = _regression_data(128, seed=0)
    xv, yv = _regression_data(32, seed=1)
    module = _fresh_candidate()
    before = evaluate_nmse(module, xv, yv)
    cfg = BlockwiseConfig(epochs=4, batch_size=16, lr=3e-2)
    history = train_block(module, x, y, cfg, seed=0)
    after = evaluate_nmse(module, xv, yv)
    assert len(history) == cfg.epochs
    assert history[-1] < 0.6 * history[0]
    assert after < 0.7 * before
    assert not module.training  # left in eval mode


def test_train_block_is_deterministic_per_seed() -> None:
    x, y = _regression_data(48, seed=0)
    cfg = BlockwiseConfig(epochs=1, batch_size=16, lr=1e-2)
    a, b, c = _fresh_candidate(), _fresh_candidate(), _fresh_candidate()
    ha, hb = train_block(a, x, y, cfg, seed=5), train_block(b, x, y, cfg, seed=5)
    hc = train_block(c, x, y, cfg, seed=6)  # other shuffling order
    assert ha == hb
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name
    assert ha != hc
    assert any(
        not torch.equal(ta, tc)
        for ta, tc in zip(a.state_dict().values(), c.state_dict().values(), strict=True)
    )


def test_train_block_counts_steps_and_respects_max_samples() -> None:
    x, y = _regression_data(40, seed=0)
    cfg = BlockwiseConfig(epochs=2, batch_size=16, lr=1e-2, max_samples=20)
    steps = []
    train_block(_fresh_candidate(), x, y, cfg, seed=0, on_step=lambda: steps.append(1))
    assert len(steps) == steps_per_job(len(x), cfg) == 2 * 2  # ceil(20 / 16) per epoch


def test_train_block_without_parameters_is_a_no_op() -> None:
    x, y = _regression_data(8, seed=0)
    assert train_block(nn.Identity(), x, y, BlockwiseConfig(epochs=2), seed=0) == []


# -------------------------------------------------------------------------------- jobs


def _randomize_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def teacher_and_cache(tmp_path_factory) -> tuple[nn.Module, list[BlockSpec], Path]:
    torch.manual_seed(0)
    teacher = _randomize_bn(create_model("tiny_resnet"))
    specs = find_blocks(teacher, (3, 16, 16))
    root = tmp_path_factory.mktemp("features")
    gen = torch.Generator().manual_seed(0)
    cache = FeatureCache(root)
    cache.write(teacher, specs, torch.randn(32, 3, 16, 16, generator=gen), "train")
    cache.write(teacher, specs, torch.randn(16, 3, 16, 16, generator=gen), "selection")
    return teacher, specs, root


CFG = BlockwiseConfig(epochs=1, batch_size=16, lr=1e-2)


def _jobs(specs: list[BlockSpec], out: Path) -> list[CandidateJob]:
    picks = [(1, "skip"), (1, "mbconv_k3_e3_relu"), (2, "skip"), (2, "teacher")]
    return [CandidateJob(i, specs[i], name, out / f"{i}_{name}.pt") for i, name in picks]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_run_jobs_trains_checkpoints_and_resumes(tmp_path: Path, teacher_and_cache) -> None:
    teacher, specs, root = teacher_and_cache
    blocks = {s.name: teacher.get_submodule(s.name) for s in specs}
    jobs = _jobs(specs, tmp_path / "ckpt")
    done: list[tuple[str, dict]] = []

    def on_done(job: CandidateJob, metrics: dict) -> None:
        done.append((job.path.name, metrics))

    run_jobs(jobs, blocks, root, CFG, base_seed=0, on_job_done=on_done)
    assert sorted(n for n, _ in done) == sorted(j.path.name for j in jobs)
    assert all(j.path.exists() for j in jobs)
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    metrics = dict(done)
    for job in jobs:
        m = metrics[job.path.name]
        assert m["block"] == job.spec.name and m["candidate"] == job.name
        assert m["val_nmse"] >= 0
    # the teacher copy and a parameter-free identity skip have nothing to train
    trained = {n: len(m["train_loss"]) for n, m in metrics.items()}
    assert trained == {
        "1_skip.pt": 0,
        "1_mbconv_k3_e3_relu.pt": 1,
        "2_skip.pt": 1,
        "2_teacher.pt": 0,
    }
    assert metrics["2_teacher.pt"]["val_nmse"] < 1e-5  # the block itself reproduces its features
    assert metrics["1_skip.pt"]["val_nmse"] > 1e-3

    # resume: nothing left to do
    done.clear()
    run_jobs(jobs, blocks, root, CFG, base_seed=0, on_job_done=on_done)
    assert done == []

    # a lost checkpoint is retrained, and only that one, to the same weights
    lost = jobs[1]
    original = _state(lost.path)
    lost.path.unlink()
    run_jobs(jobs, blocks, root, CFG, base_seed=0, on_job_done=on_done)
    assert [n for n, _ in done] == [lost.path.name]
    for key, tensor in _state(lost.path).items():
        assert torch.equal(tensor, original[key]), key


def test_job_results_do_not_depend_on_order(tmp_path: Path, teacher_and_cache) -> None:
    teacher, specs, root = teacher_and_cache
    blocks = {s.name: teacher.get_submodule(s.name) for s in specs}
    forward = _jobs(specs, tmp_path / "a")[:2]
    backward = _jobs(specs, tmp_path / "b")[:2][::-1]
    run_jobs(forward, blocks, root, CFG, base_seed=3, on_job_done=lambda *_: None)
    run_jobs(backward, blocks, root, CFG, base_seed=3, on_job_done=lambda *_: None)
    for job in forward:
        a, b = _state(job.path), _state(tmp_path / "b" / job.path.name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_process_pool_matches_in_process(tmp_path: Path, teacher_and_cache) -> None:
    teacher, specs, root = teacher_and_cache
    blocks = {s.name: teacher.get_submodule(s.name) for s in specs}
    serial = _jobs(specs, tmp_path / "serial")[:2]
    pooled = _jobs(specs, tmp_path / "pool")[:2]
    run_jobs(serial, blocks, root, CFG, base_seed=5, on_job_done=lambda *_: None)
    done: list[str] = []
    parallel = BlockwiseConfig(**{**CFG.__dict__, "workers": 2})
    run_jobs(
        pooled,
        blocks,
        root,
        parallel,
        base_seed=5,
        on_job_done=lambda job, _m: done.append(job.name),
    )
    assert sorted(done) == sorted(j.name for j in pooled)
    for a_job, b_job in zip(serial, pooled):
        a, b = _state(a_job.path), _state(b_job.path)
        # same seed, same data: equal up to thread-count rounding in the kernels
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_load_candidate_restores_trained_module(tmp_path: Path, teacher_and_cache) -> None:
    teacher, specs, root = teacher_and_cache
    blocks = {s.name: teacher.get_submodule(s.name) for s in specs}
    job = _jobs(specs, tmp_path)[1]  # mbconv on layer1.1
    results: dict[str, dict] = {}
    run_jobs([job], blocks, root, CFG, 0, lambda j, m: results.update({j.name: m}))

    module, metrics = load_candidate(job, blocks[job.spec.name])
    assert metrics == results[job.name]
    assert not module.training
    xv, yv = FeatureCache(root).block("selection", job.block_index)
    assert evaluate_nmse(module, xv, yv) == pytest.approx(metrics["val_nmse"], rel=1e-5)

    x = torch.from_numpy(np.asarray(xv, dtype=np.float32))
    again, _ = load_candidate(job, blocks[job.spec.name])
    untrained = build_candidate(job.name, job.spec, blocks[job.spec.name]).eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), again(x), rtol=0, atol=0)
        assert not torch.allclose(module(x), untrained(x))  # training changed the weights


def test_candidate_job_seed() -> None:
    spec_a, spec_b = (
        BlockSpec("layer1.0", (8, 4, 4), (8, 4, 4)),
        BlockSpec("layer1.1", (8, 4, 4), (8, 4, 4)),
    )
    job = CandidateJob(0, spec_a, "skip", Path("x.pt"))
    same = CandidateJob(5, spec_a, "skip", Path("elsewhere/y.pt"))
    assert job.seed(0) == job.seed(0) == same.seed(0)
    assert 0 <= job.seed(0) < 2**32
    others = {
        CandidateJob(0, spec_a, "mbconv_k3_e3_relu", Path("x.pt")).seed(0),
        CandidateJob(0, spec_b, "skip", Path("x.pt")).seed(0),
        job.seed(1),
    }
    assert job.seed(0) not in others and len(others) == 3
    # stable across processes and releases: derived from a content hash, not hash()
    assert job.seed(0) == 3871538740
