"""DDP with gloo on CPU processes: 2 ranks of batch B must train like 1 process of batch 2B, and a
sharded index build must equal the one-process build.

Two ranks are started once (set up as torchrun would: RANK, WORLD_SIZE, ... in the environment) and
run three jobs: TIRG steps, `cirlab train` then `--resume`, a sharded index build; each test compares
one job with the same job done by this one process.

BatchNorm: PyTorch's SyncBatchNorm runs on CUDA only, so on CPU processes each rank's BatchNorm would
normalise with its own slice's statistics and could not match one process. The TIRG check therefore
trains with the model in eval mode: BatchNorm uses its running statistics (TIRG's gate has
BatchNorm1d) and the LSTM's dropout is off, which also makes the randomness identical. The
end-to-end run uses image_only, which has neither, so it trains in train mode through `cirlab train`.

The ranks are forked, not spawned: spawned children re-import torch and cirlab (about 40 s on two
busy cores), forked ones inherit them. Each goes single-threaded first, as DataLoader workers do,
so no thread pool of the parent is used after the fork.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from cirlab.acceleration import grad_scaler
from cirlab.cli import main
from cirlab.config import load_config
from cirlab.distributed import DistContext, process_group
from cirlab.encoders.text import Vocabulary
from cirlab.index.build import build_index
from cirlab.index.faiss_index import FaissIndex
from cirlab.models.registry import create_model
from cirlab.train import TrainingForward, build_optimizer, compute_loss, train, train_step

WORLD = 2
TIRG = ["model.name=tirg", "model.image_backbone=resnet18", "model.image_weights=null", "model.backbone_upto=layer1",
        "model.embed_dim=8", "train.lr=0.1"]
TEXTS = ["make it red", "add a cube", "remove the small sphere", "move it left", "make the cube blue"]
# float32 on every CPU: a bfloat16 step (train.cpu_amp, on CPUs with native bfloat16) rounds each slice's products
# differently from the combined batch's, far beyond the tolerance of an equivalence check.
RUN = ["train.cpu_amp=false", "model.name=image_only", "model.image_backbone=efficientnet_lite0",
       "model.backbone_upto=stage3", "model.pooling=flatten", "model.freeze_backbone=true", "model.embed_dim=16",
       "train.loss=batch_classification", "train.lr=0.1", "train.log_every=1", "train.eval_every=2",
       "train.device=cpu", "data.val_fraction=0.2"]


def _tirg_steps(ctx: DistContext, global_batch: int, steps: int = 3) -> dict[str, torch.Tensor]:
    """A few SGD steps of a tiny TIRG (batch-classification loss); every rank draws the same global batch."""
    torch.manual_seed(0)
    config = load_config(None, TIRG)
    model = create_model(config.model, Vocabulary.build(TEXTS)).eval().to(ctx.device)  # see the module docstring
    forward = ctx.wrap(TrainingForward(model))
    optimizer = build_optimizer(model, config)
    loss_fn = partial(compute_loss, "batch_classification", generator=torch.Generator())
    data = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 16, 16, generator=data).to(ctx.device)
    for _ in range(steps):
        mine = ctx.shard(torch.randperm(16, generator=data)[:global_batch].tolist())
        train_step(forward, optimizer, grad_scaler(None, ctx.device),
                   (images[mine], [TEXTS[i % 5] for i in mine], images[[(i + 1) % 16 for i in mine]]), loss_fn, ctx)
    return {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}


def _run_settings(root: Path, iterations: int, batch_size: int) -> list[str]:
    return [f"data.root={root}", *RUN, f"train.iterations={iterations}", f"train.batch_size={batch_size}"]


def _run_args(root: Path, out: Path, iterations: int, batch_size: int) -> list[str]:
    settings = _run_settings(root, iterations, batch_size)
    return ["train", *[f"--set={setting}" for setting in settings], "--out", str(out)]


def _as_rank(rank: int, port: int) -> None:
    """What torchrun puts in each worker's environment."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def _worker(rank: int, root: Path, gallery: Path, out: Path, ports: list[int]) -> None:
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    _as_rank(rank, ports[0])
    with process_group("cpu") as ctx:
        weights = _tirg_steps(ctx, global_batch=8)
    if ctx.is_main:
        save_file(weights, out / "tirg.safetensors")

    _as_rank(rank, ports[1])
    assert main(_run_args(root, out / "run", iterations=2, batch_size=4)) == 0
    _as_rank(rank, ports[2])
    assert main([*_run_args(root, out / "run", iterations=4, batch_size=4), "--resume"]) == 0

    _as_rank(rank, ports[3])
    with process_group("cpu") as ctx:
        index = build_index(out / "run" / "last", gallery, out / "index", batch_size=2, commit_every=3,
                            progress=False, ctx=ctx)
    assert (index is not None) == ctx.is_main
    if index is not None:
        index.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gallery(tiny_css, tmp_path_factory) -> Path:
    """7 CSS images: chunks of 3 give the two ranks shares of 1 and 2, then 0 and 1 (an idle rank)."""
    folder = tmp_path_factory.mktemp("gallery")
    for path in sorted((tiny_css / "images").glob("*.png"))[:7]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def two_ranks(tiny_css, gallery, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    processes = mp.start_processes(_worker, args=(tiny_css, gallery, out, [_free_port() for _ in range(4)]),
                                   nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + 300
    while not processes.join(timeout=5):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.terminate()
            pytest.fail("the two gloo ranks did not finish within 300 s")
    return out


def test_shards_of_a_global_batch_are_its_contiguous_slices():
    batch = list(range(12))
    shards = [DistContext(rank=rank, world_size=3).shard(batch) for rank in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [DistContext(rank=rank, world_size=2).share(3) for rank in range(2)] == [range(0, 1), range(1, 3)]
    assert [list(DistContext(rank=rank, world_size=2).share(1)) for rank in range(2)] == [[], [0]]
    with pytest.raises(ValueError, match="global batch of 12 does not split evenly over 5 processes"):
        DistContext(rank=0, world_size=5).shard(batch)


def test_two_gloo_ranks_train_tirg_like_one_process_on_the_combined_batch(two_ranks):
    distributed = load_file(two_ranks / "tirg.safetensors")
    single = _tirg_steps(DistContext(), global_batch=8)
    torch.manual_seed(0)
    initial = create_model(load_config(None, TIRG).model, Vocabulary.build(TEXTS)).state_dict()
    assert distributed.keys() == single.keys()
    moved = max((single[name] - initial[name]).abs().max().item() for name in single)
    assert moved > 1e-2  # the steps changed the weights far beyond the tolerance below
    for name in single:
        torch.testing.assert_close(distributed[name], single[name], atol=1e-5, rtol=0, msg=name)


def test_cli_training_under_two_ranks_matches_one_process_and_resumes_exactly(two_ranks, tiny_css, tmp_path):
    train(load_config(None, _run_settings(tiny_css, iterations=4, batch_size=8)), tmp_path / "single", progress=False)
    run = two_ranks / "run"
    distributed = load_file(run / "last" / "model.safetensors")
    single = load_file(tmp_path / "single" / "last" / "model.safetensors")
    assert distributed.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(distributed[name], single[name], atol=1e-5, rtol=0, msg=name)
    # Rank 0 alone logged (every step once, across the resume) and checkpointed every rank's RNG state.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "loss" in record] == [1, 2, 3, 4]
    assert [record["step"] for record in records if "val" in record] == [2, 4]
    assert json.loads((run / "last" / "trainer.json").read_text())["world_size"] == WORLD
    rng = load_file(run / "last" / "trainer.safetensors")
    assert {"rng.torch", "rng.torch.rank1", "rng.triplets"} <= rng.keys()
    assert not torch.equal(rng["rng.torch"], rng["rng.torch.rank1"])  # each rank draws its own dropout masks


def test_sharded_gallery_embedding_builds_the_single_process_index(two_ranks, gallery, tmp_path):
    build_index(two_ranks / "run" / "last", gallery, tmp_path / "single", batch_size=2, commit_every=3,
                progress=False).close()
    with FaissIndex.open(two_ranks / "index") as sharded, FaissIndex.open(tmp_path / "single") as single:
        assert sharded.ids() == single.ids() == sorted(path.name for path in gallery.iterdir())
        np.testing.assert_allclose(sharded.reconstruct(sharded.ids()), single.reconstruct(single.ids()), atol=1e-6)
        # Committed chunk by chunk (generation 0 is the empty index, then one per chunk of 3), as one process does.
        assert sharded.info()["generation"] == single.info()["generation"] == 3


def test_a_two_rank_run_is_not_resumed_by_one_process(two_ranks, tiny_css, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_ranks / "run", run)
    before = (run / "metrics.jsonl").read_text()
    assert main([*_run_args(tiny_css, run, iterations=6, batch_size=8), "--resume"]) == 2
    assert f"{run} was trained by 2 process(es); resume it with as many, not 1" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(("device", "backend"), [("cpu", "gloo"), pytest.param("cuda", "nccl", marks=CUDA)])
def test_torchrun_with_one_process_joins_a_group_and_trains_like_no_group(monkeypatch, device, backend):
    """`torchrun --nproc_per_node 1` goes through DDP and the collectives: how one GPU checks NCCL."""
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    # _tirg_steps trains in eval mode (see the module docstring), where cuDNN's LSTM has no backward.
    with torch.backends.cudnn.flags(enabled=False):
        with process_group(device) as ctx:
            assert ctx.distributed and torch.distributed.get_backend() == backend
            grouped = _tirg_steps(ctx, global_batch=8)
        assert not torch.distributed.is_initialized()
        alone = _tirg_steps(DistContext(device=torch.device(device)), global_batch=8)
    for name in alone:
        torch.testing.assert_close(grouped[name], alone[name], atol=1e-6, rtol=0, msg=name)


@CUDA
def test_cli_training_under_one_nccl_rank_matches_plain_cuda_training(tiny_css, tmp_path):
    """The whole `cirlab train` under torchrun on one GPU (NCCL, DDP, rank-0 checkpoints) against no torchrun."""
    settings = [*_run_settings(tiny_css, iterations=4, batch_size=8), "train.device=cuda", "train.amp=false"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "-m", "cirlab", "train", *[f"--set={setting}" for setting in settings], "--out", str(tmp_path / "rank")]
    subprocess.run(command, check=True, timeout=600)
    train(load_config(None, settings), tmp_path / "plain", progress=False)
    grouped = load_file(tmp_path / "rank" / "last" / "model.safetensors")
    plain = load_file(tmp_path / "plain" / "last" / "model.safetensors")
    assert grouped.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(grouped[name], plain[name], atol=1e-5, rtol=0, msg=name)
