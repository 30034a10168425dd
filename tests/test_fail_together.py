"""fail_together: a rank that fails alone (its node lacks a file) stops every rank, and rank
0 says what failed where, instead of the others waiting at their next collective."""
import json

import pytest
import torch.multiprocessing as mp

from engine_utils import free_port

# What each of the two ranks does inside the block, per case.
CASES = {
    "rank 1 alone": ("ok", "data"),
    "both alike": ("data", "data"),
    "both differently": ("data", "checkpoint"),
    "a crash on rank 1": ("ok", "crash"),
    "nobody": ("ok", "ok"),
}


def _act(what: str, rank: int):
    from dmt.errors import CheckpointError, DataError
    if what == "data":
        raise DataError("image folder 'data' holds no image files")
    if what == "checkpoint":
        raise CheckpointError(f"rank {rank} cannot read ckpt/mp_rank_00_model_states.pt")
    if what == "crash":
        raise ValueError("boom")


def _worker(rank, port, out_dir):
    import os

    import torch.distributed as dist

    from dmt.engine.distributed import fail_together
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    seen = {}
    for case, actions in CASES.items():
        try:
            with fail_together("cpu"):
                _act(actions[rank], rank)
            seen[case] = None
        except Exception as err:  # noqa: BLE001
            seen[case] = [type(err).__name__, str(err), getattr(err, "same_on_every_rank", None),
                          getattr(err, "every_rank_stops", None)]
    # Every rank reached this point, in step: the collectives above all matched.
    dist.barrier()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out = tmp_path_factory.mktemp("fail_together")
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=2, start_method="spawn",
                       join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_a_rank_failing_alone_stops_both_and_rank_0_names_it(outcomes):
    rank0, rank1 = outcomes[0]["rank 1 alone"], outcomes[1]["rank 1 alone"]
    assert rank0 == ["DMTError", "image folder 'data' holds no image files (on rank 1)", True,
                     True]
    # the failing rank keeps its own error and words, for its own node's log; both ranks know
    # the other stops too (so they can leave the process group together)
    assert rank1 == ["DataError", "image folder 'data' holds no image files", False, True]


def test_ranks_failing_alike_say_it_once(outcomes):
    said = "image folder 'data' holds no image files (on all 2 ranks)"
    assert outcomes[0]["both alike"] == outcomes[1]["both alike"] == ["DataError", said, True,
                                                                      True]


def test_ranks_failing_differently_are_each_named(outcomes):
    kind, text, agreed, all_stop = outcomes[0]["both differently"]
    assert (kind, agreed, all_stop) == ("DataError", True, True)
    assert text == ("image folder 'data' holds no image files (on rank 0); rank 1 cannot read "
                    "ckpt/mp_rank_00_model_states.pt (on rank 1)")
    assert outcomes[1]["both differently"] == [
        "CheckpointError", "rank 1 cannot read ckpt/mp_rank_00_model_states.pt", False, True]


def test_a_crash_keeps_its_type_and_rank_0_names_it(outcomes):
    assert outcomes[1]["a crash on rank 1"] == ["ValueError", "boom", None, None]
    # rank 0 must not wait at a barrier for a rank that leaves with its traceback
    assert outcomes[0]["a crash on rank 1"] == ["DMTError", "ValueError: boom (on rank 1)", True,
                                                False]


def test_nobody_failing_passes_through(outcomes):
    assert outcomes[0]["nobody"] is None and outcomes[1]["nobody"] is None


def test_one_process_raises_the_error_itself():
    from dmt.engine.distributed import fail_together
    from dmt.errors import DataError
    with pytest.raises(DataError, match=r"^image folder 'data' holds no image files$"):
        with fail_together("cpu"):
            _act("data", 0)
