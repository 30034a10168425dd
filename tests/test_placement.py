"""Placements: 1 teacher rank + 2 student ranks (gloo, real processes) train exactly like
2 colocated ranks on the same data, and DeepSpeed confined to the student ranks can
save and load checkpoints while the teacher rank serves."""
import json
import os
from datetime import timedelta

import pytest
import torch

from dmt.errors import ConfigError
from dmt.placement import RankLayout
from engine_utils import free_port

STEPS = 4
MICRO_BATCH = 4
IMG = 32
CKPT_STEP = 2


def test_rank_layout():
    layout = RankLayout(world_size=5, teacher_ranks=2)
    assert layout.student_ranks == [0, 1, 2]
    assert [r for r in range(5) if layout.is_teacher(r)] == [3, 4]
    assert [layout.teacher_of(s) for s in range(3)] == [3, 4, 3]
    assert layout.students_of(3) == [0, 2] and layout.students_of(4) == [1]
    assert layout.is_teacher(4) and not layout.is_teacher(0)
    with pytest.raises(ConfigError):
        RankLayout(world_size=3, teacher_ranks=2)  # a teacher rank would serve nobody
    with pytest.raises(ConfigError):
        RankLayout(world_size=3, teacher_ranks=0)


def _batch(data_rank: int, num_students: int, step: int) -> dict:
    """The same images for a student rank and for the teacher rank serving it."""
    g = torch.Generator().manual_seed(1000 * data_rank + step)
    teacher = torch.randn(MICRO_BATCH, 3, IMG, IMG, generator=g)
    student = teacher + 0.3 * torch.randn(teacher.shape, generator=g)  # "strong" view
    first = MICRO_BATCH * (step * num_students + data_rank)
    return {"teacher": teacher, "student": student,
            "index": torch.arange(first, first + MICRO_BATCH)}


def _teachers():
    from dmt.models import FrozenTeacher, TeacherEnsemble, create_encoder
    out = []
    for i in range(2):
        torch.manual_seed(10 + i)
        out.append(FrozenTeacher(create_encoder("vit_tiny_patch16_224", IMG, depth=2),
                                 f"t{i}", torch.float32))
    return TeacherEnsemble(out)


def _worker(rank, world, port, kind, teacher_ranks, transfers, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                      DEEPSPEED_TIMEOUT="7")  # minutes, read when deepspeed is imported
    torch.set_num_threads(1)
    import dmt  # noqa: F401  (before timm)
    import deepspeed
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120))
    import torch.distributed as dist

    from dmt.models.fast import optimize_teachers

    is_teacher = kind == "dedicated" and rank >= world - teacher_ranks
    # Teachers live only where they run: every rank in colocated, teacher ranks otherwise.
    teachers = optimize_teachers(_teachers(), torch.float32, stack="never") \
        if kind == "colocated" or is_teacher else None
    # Several sessions in one process group (one spawn is most of this test's time): each
    # builds a fresh placement, student and engine, as a new run would.
    for session, transfer in enumerate(transfers):
        _session(rank, kind, teacher_ranks, transfer, teachers, out_dir,
                 checkpoint=session == 0)
    dist.barrier()


def _session(rank, kind, teacher_ranks, transfer, teachers, out_dir, checkpoint):
    import deepspeed

    from dmt.methods.dmt import DMT
    from dmt.models import Student
    from dmt.placement import build_placement

    transfer_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[transfer]
    torch.manual_seed(0)
    student = Student("vit_tiny_patch16_224", teacher_dim=192, img_size=IMG)
    placement = build_placement(kind, teacher_ranks, DMT(student, teachers),
                                micro_batch=MICRO_BATCH, transfer_dtype=transfer_dtype)
    if kind == "dedicated":  # the targets travel on a group of their own (see dedicated.py)
        import torch.distributed as dist
        assert placement.stream is not None and placement.stream != dist.group.WORLD
        assert dist.get_process_group_ranks(placement.stream) == list(range(dist.get_world_size()))
    ckpt_dir = os.path.join(out_dir, f"ckpt_{kind}_{transfer}")
    tag = f"global_step{CKPT_STEP}"
    if placement.role == "teacher":
        batches = {s: [_batch(r, w, i) for i in range(STEPS)]
                   for s, (r, w) in zip(placement.students, placement.data_shards)}
        placement.serve(batches, micro_batches=STEPS,
                        after_each=lambda i: placement.join_checkpoint(tag)
                        if checkpoint and i == CKPT_STEP else None)
        return
    ds_config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9}
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.05)
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config,
                                      mpu=placement.mpu)
    assert engine.dp_world_size == placement.data_world_size
    # A stalled peer: the engine's gradient reductions give up after DEEPSPEED_TIMEOUT (set
    # by _worker), in both placements (DeepSpeed's own world clone would wait 30 min).
    for group in (engine.data_parallel_group, engine.seq_data_parallel_group):
        assert _timeout(group) == timedelta(minutes=7)
    method = DMT(engine, teachers)
    losses, saved = [], None
    for step in range(STEPS):
        batch = _batch(placement.data_rank, placement.data_world_size, step)
        out = method(batch, targets=placement.targets(batch))
        engine.backward(out["loss"])
        engine.step()
        losses.append(out["loss"].item())
        if kind == "dedicated" and checkpoint and step + 1 == CKPT_STEP:
            engine.save_checkpoint(ckpt_dir, tag=tag)  # the teacher joins via after_each
            saved = [p.detach().clone() for p in engine.module.parameters()]
    placement.close()
    restored = None
    if saved is not None:
        engine.load_checkpoint(ckpt_dir, tag=tag)  # no teacher participation needed
        restored = all(torch.equal(a, b) for a, b in zip(saved, engine.module.parameters()))
    with open(os.path.join(out_dir, f"{kind}_{transfer}_rank{rank}.json"), "w") as f:
        json.dump({"losses": losses, "restored": restored,
                   "dp": [engine.dp_world_size, placement.data_rank]}, f)


def _timeout(group) -> timedelta:
    return group._get_backend(torch.device("cpu")).options._timeout


def _run(world, kind, teacher_ranks, transfers, out_dir) -> dict[str, dict[int, dict]]:
    import torch.multiprocessing as mp
    mp.start_processes(_worker, args=(world, free_port(), kind, teacher_ranks, transfers,
                                      str(out_dir)),
                       nprocs=world, start_method="spawn", join=True)
    return {t: {r: json.loads((out_dir / f"{kind}_{t}_rank{r}.json").read_text())
                for r in range(world - teacher_ranks)} for t in transfers}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_dedicated_matches_colocated(tmp_path):
    colocated = _run(2, "colocated", 0, ["fp32"], tmp_path)["fp32"]
    dedicated = _run(3, "dedicated", 1, ["bf16", "fp32"], tmp_path)
    dedicated_bf16, dedicated_fp32 = dedicated["bf16"], dedicated["fp32"]
    for rank in (0, 1):
        ref = colocated[rank]
        for got in (dedicated_bf16[rank], dedicated_fp32[rank]):
            assert got["dp"] == ref["dp"] == [2, rank]  # the engine spans the 2 students only
        # Checkpoint saved (teacher rank joining) and restored, in the first session.
        assert dedicated_bf16[rank]["restored"] is True
        # fp32 targets: the very same computation, bit for bit.
        assert dedicated_fp32[rank]["losses"] == ref["losses"]
        # bf16 targets (8 mantissa bits) moved the per-step losses by <= 3.4e-4 relative in
        # the run that set this bound; 2e-3 leaves room for other seeds and libraries.
        torch.testing.assert_close(torch.tensor(dedicated_bf16[rank]["losses"]),
                                   torch.tensor(ref["losses"]), rtol=2e-3, atol=0)


def test_each_teacher_rank_reads_the_data_shards_of_the_students_it_serves():
    """2 teacher ranks, 3 students: a student's shard is its rank among all students,
    whichever teacher rank serves it (a teacher's own count would misalign them)."""
    from dmt.placement import DedicatedTeacher
    layout = RankLayout(world_size=5, teacher_ranks=2)
    shards = {}
    for rank in (3, 4):
        teacher = DedicatedTeacher.__new__(DedicatedTeacher)
        teacher.layout, teacher.students = layout, layout.students_of(rank)
        shards[rank] = teacher.data_shards
    assert shards == {3: [(0, 3), (2, 3)], 4: [(1, 3)]}
