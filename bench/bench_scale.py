"""Candidate jobs per minute on each executor, and what training every candidate costs next to
training the teacher (images seen; wall time on the same hardware, same run).

A zoo teacher (tiny_effnet) is trained on scikit-learn's digits; its blocks' features are
captured once; every candidate of every block is trained blockwise (one epoch) by the
in-process executor, process pools and a local Ray cluster with 1 and 2 workers. The
checkpoints of every executor are compared with the in-process ones (one thread per job).

    python bench/bench_scale.py                      # CPU: inprocess, process x1/x2, ray x1/x2
    python bench/bench_scale.py --device cuda        # a GPU, where one is present
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from archnet.blocks import find_blocks
from archnet.candidates import build_pool
from archnet.data import digits
from archnet.distill.blockwise import BlockwiseConfig, CandidateJob, run_jobs
from archnet.executors import build_executor
from archnet.features import FeatureCache
from archnet.zoo import create_model, train_classifier

SIZE = 32


def _jobs(teacher, specs, out: Path) -> list[CandidateJob]:
    jobs = []
    for i, spec in enumerate(specs):
        pool = build_pool(spec, teacher.get_submodule(spec.name), ["*"])
        jobs += [CandidateJob(i, spec, n, out / f"{i:03d}" / f"{n}.pt") for n in pool]
    return jobs


def _states(jobs) -> list[dict]:
    return [torch.load(j.path, weights_only=False)["state_dict"] for j in jobs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--images", type=int, default=600, help="unlabeled images the jobs learn from")
    a = p.parse_args()
    train, held = digits(size=SIZE).split(0.7, seed=0)
    torch.manual_seed(0)
    teacher = create_model("tiny_effnet", num_classes=10)
    begin = time.perf_counter()
    teacher = train_classifier(teacher, train, a.teacher_epochs, 1e-2, progress=False).eval()
    teacher_s = time.perf_counter() - begin
    teacher_images = a.teacher_epochs * len(train.images)
    specs = find_blocks(teacher, (3, SIZE, SIZE))
    root = Path(tempfile.mkdtemp(prefix="archnet-scale-"))
    cache = FeatureCache(root / "features")
    images = held.images[: a.images]
    cache.write(teacher, specs, images, "train", device=a.device)
    cache.write(teacher, specs, held.images[-64:], "selection", device=a.device)
    cfg = BlockwiseConfig(epochs=1, batch_size=32)
    blocks = {s.name: teacher.get_submodule(s.name) for s in specs}
    runs = [("inprocess", 1), ("process", 1), ("process", 2), ("ray", 1), ("ray", 2)]
    table = Table(title=f"candidate jobs on a {torch.get_num_threads()}-thread machine, {a.device}")
    for col in ("executor", "workers", "jobs", "seconds", "jobs / min", "same checkpoints"):
        table.add_column(col, justify="left" if col == "executor" else "right")
    reference = None
    for name, workers in runs:
        if name == "ray":
            import ray

            ray.shutdown()
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        executor = build_executor(name, workers=workers)
        jobs = _jobs(teacher, specs, root / f"{name}{workers}")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # every job on one thread, as each worker runs
        begin = time.perf_counter()
        failed = run_jobs(
            jobs,
            blocks,
            root / "features",
            cfg,
            0,
            lambda *_: None,
            executor=executor,
            device=a.device,
        )
        seconds = time.perf_counter() - begin
        torch.set_num_threads(threads)
        states = _states(jobs)
        reference = reference or states
        same = all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(states, reference))
        table.add_row(
            name,
            str(workers),
            f"{len(jobs) - len(failed)}/{len(jobs)}",
            f"{seconds:.1f}",
            f"{60 * len(jobs) / seconds:.1f}",
            "yes" if same else "NO",
        )
        if name == "ray":
            ray.shutdown()
        trained = sum(j.name != "teacher" for j in jobs)  # the teacher's block learns nothing
    n_images = trained * cfg.epochs * len(images)
    console = Console()
    console.print(table)
    console.print(
        f"teacher training: {teacher_images} images seen, {teacher_s:.1f} s; the {trained} "
        f"trained candidate jobs: {n_images} block inputs seen ({n_images / teacher_images:.2f}x "
        "the teacher's images, each through one block only); their wall time is in the table"
    )


if __name__ == "__main__":
    main()
