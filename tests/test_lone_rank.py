"""skip_lone_allreduce: one data-parallel rank without ZeRO trains exactly as before,
without DeepSpeed's all-reduce over that one rank; ZeRO engines keep their reduction."""
import json

import torch
import torch.multiprocessing as mp

from engine_utils import free_port


def _train(zero_stage: int, skip: bool) -> tuple:
    import deepspeed

    from dmt.engine.distributed import skip_lone_allreduce
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4,
              "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    skipped = skip_lone_allreduce(engine) if skip else False
    reductions = []
    original = engine.allreduce_gradients
    engine.allreduce_gradients = lambda *a, **k: (reductions.append(1), original(*a, **k))[1]
    for step in range(3):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        engine.backward(engine(x).square().mean())
        engine.step()
    weights = [p.detach().flatten().tolist() for p in model.parameters()]
    return skipped, len(reductions), weights


def _worker(rank, port, out_dir):
    import os

    import deepspeed
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    results = {f"{stage}-{skip}": _train(stage, skip) for stage in (0, 2) for skip in (False, True)}
    with open(f"{out_dir}/result.json", "w") as f:
        json.dump(results, f)


def test_lone_rank_skips_the_allreduce_and_trains_the_same(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=1,
                       start_method="spawn", join=True)
    r = json.loads((tmp_path / "result.json").read_text())
    (skipped, reductions, weights), (_, reductions_before, weights_before) = r["0-True"], r["0-False"]
    assert skipped and reductions == 0 and reductions_before == 3
    assert weights == weights_before  # bit for bit: a one-rank all-reduce changes nothing
    skipped, reductions, weights = r["2-True"]
    assert not skipped and reductions == 3 and weights == r["2-False"][2]
