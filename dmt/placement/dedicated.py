"""Dedicated teacher ranks: some ranks only run teachers and stream fused targets.

Student rank s is served by teacher rank layout.teacher_of(s). A teacher rank loads the
very batches its students load (same data shard: the student's rank among the S student
ranks), computes the fused targets, and sends them in the transfer dtype (bfloat16 by
default). Pipelining: a
student keeps `prefetch` receives posted ahead of the batch it trains on, so the teacher
computes and sends batch i+1.. while the student trains on batch i.

Wire format, one message per batch and student: a uint8 buffer holding the B int64 image
indices (-1 = padding of a short batch, END in slot 0 = end of stream) followed by the
[B, T, D] targets in the transfer dtype. The indices let the student check, without a
host sync per step, that targets and images belong together.

The stream has a process group of its own: with NCCL's eager initialisation (DeepSpeed
binds a device at init), point-to-point calls on the world group share the world
communicator and its stream, so a student's posted receives would hold up its next
world-wide collective (a barrier, a checkpoint) that the teacher must join before it
sends: a deadlock gloo never shows.
"""
from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.distributed as dist

from dmt.errors import ConfigError, DMTError
from dmt.placement.groups import StudentGroups
from dmt.placement.layout import RankLayout
from dmt.transfer import to_device

END = -2
PAD = -1
TRANSFER_DTYPES = {0: torch.bfloat16, 1: torch.float16, 2: torch.float32}
_DTYPE_CODES = {v: k for k, v in TRANSFER_DTYPES.items()}


class TargetsMismatchError(DMTError):
    """Targets from the teacher rank do not belong to the student's batch."""


def comm_device() -> torch.device:
    """Where point-to-point buffers must live for the current backend."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Wire:
    """Packing of one message: [B int64 indices | B*T*D transfer-dtype targets] as bytes."""

    def __init__(self, batch: int, tokens: int, dim: int, dtype: torch.dtype):
        self.batch, self.tokens, self.dim, self.dtype = batch, tokens, dim, dtype
        self.index_bytes = 8 * batch  # first, so every view below is aligned
        self.nbytes = self.index_bytes + batch * tokens * dim * dtype.itemsize

    def empty(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.nbytes, dtype=torch.uint8, device=device)

    def indices(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[: self.index_bytes].view(torch.int64)

    def targets(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[self.index_bytes:].view(self.dtype).view(self.batch, self.tokens, self.dim)


class DedicatedStudent:
    """Student side: targets(batch) -> fp32 [B, T, D] received from the serving teacher."""

    role = "student"
    kind = "dedicated"

    def __init__(self, layout: RankLayout, groups: StudentGroups,
                 device: torch.device | None = None, micro_batch: int | None = None,
                 stream_group=None):
        self.rank = dist.get_rank()
        self.layout, self.mpu, self.stream = layout, groups, stream_group
        self.teacher = layout.teacher_of(self.rank)
        self.data_rank, self.data_world_size = self.rank, layout.num_students
        self.comm_device = comm_device()
        self.device = torch.device(device) if device is not None else self.comm_device
        header = torch.zeros(5, dtype=torch.int64, device=self.comm_device)
        # Handshake: the teacher states the shapes.
        dist.recv(header, src=self.teacher, group=self.stream)
        batch, tokens, dim, self.prefetch, code = (int(v) for v in header.tolist())
        if micro_batch is not None and micro_batch != batch:
            raise ConfigError(f"student rank {self.rank} uses micro-batch {micro_batch} but its "
                              f"teacher rank {self.teacher} sends {batch}")
        self.wire = _Wire(batch, tokens, dim, TRANSFER_DTYPES[code])
        # Checking indices reads a device value: every batch on CPU, every 100 on GPUs.
        self.check_every = 1 if self.comm_device.type == "cpu" else 100
        self._mismatch = torch.zeros((), dtype=torch.int64, device=self.comm_device)
        self._pending: deque[tuple[torch.Tensor, object]] = deque()
        self._received, self._ended = 0, False
        for _ in range(self.prefetch):
            self._post()

    def _post(self) -> None:
        buf = self.wire.empty(self.comm_device)
        self._pending.append((buf, dist.irecv(buf, src=self.teacher, group=self.stream)))

    def _check(self) -> None:
        if int(self._mismatch.item()):
            raise TargetsMismatchError(
                f"student rank {self.rank}: targets from teacher rank {self.teacher} belong to "
                "other images (the teacher's data shard or order differs from the student's, "
                "or its stream ended early: same dataset, seed, batch size and steps needed)")

    def targets(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not self._pending:
            raise DMTError(f"student rank {self.rank}: the teacher stream has ended")
        buf, work = self._pending.popleft()
        work.wait()
        self._post()  # keep `prefetch` receives in flight while this batch trains
        n = len(batch["student"])
        if n > self.wire.batch:
            raise ConfigError(f"batch of {n} images exceeds the micro-batch {self.wire.batch}")
        if "index" in batch:
            sent = self.wire.indices(buf)[:n]
            self._mismatch += (sent != to_device(batch["index"], sent.device)).sum()
        self._received += 1
        if self._received % self.check_every == 0:
            self._check()
        return self.wire.targets(buf)[:n].to(self.device, torch.float32, non_blocking=True)

    def close(self) -> None:
        """Checks the last indices and drains the stream up to the teacher's end marker."""
        self._check()
        while self._pending:
            buf, work = self._pending.popleft()
            work.wait()
            if int(self.wire.indices(buf)[0]) == END:
                self._ended = True
            elif not self._ended:
                self._post()  # the teacher still has batches this student did not use


class DedicatedTeacher:
    """Teacher side: serve(batches) computes fused targets and streams them to students."""

    role = "teacher"
    kind = "dedicated"

    def __init__(self, layout: RankLayout, groups: StudentGroups, method, micro_batch: int,
                 device: torch.device | None = None,
                 transfer_dtype: torch.dtype = torch.bfloat16, prefetch: int = 2,
                 stream_group=None):
        if transfer_dtype not in _DTYPE_CODES:
            raise ConfigError(f"transfer dtype must be one of {list(_DTYPE_CODES)}")
        if prefetch < 1:
            raise ConfigError("prefetch must be >= 1")
        self.rank = dist.get_rank()
        self.layout, self.mpu, self.method, self.stream = layout, groups, method, stream_group
        self.students = layout.students_of(self.rank)
        self.comm_device = comm_device()
        self.device = torch.device(device) if device is not None else self.comm_device
        self.prefetch = prefetch
        teachers = method.teachers
        self.wire = _Wire(micro_batch, teachers.num_tokens, teachers.embed_dim, transfer_dtype)
        header = torch.tensor([micro_batch, teachers.num_tokens, teachers.embed_dim, prefetch,
                               _DTYPE_CODES[transfer_dtype]], dtype=torch.int64,
                              device=self.comm_device)
        for s in self.students:
            dist.send(header, dst=s, group=self.stream)

    @property
    def data_shards(self) -> list[tuple[int, int]]:
        """(rank, world_size) to give the data loader, once per served student."""
        return [(s, self.layout.num_students) for s in self.students]

    def _pack(self, tokens: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        n = tokens.shape[0]
        if n > self.wire.batch:
            raise ConfigError(f"batch of {n} images exceeds the micro-batch {self.wire.batch}")
        buf = self.wire.empty(self.comm_device)
        idx, out = self.wire.indices(buf), self.wire.targets(buf)
        idx.fill_(PAD)
        if index is not None:
            idx[:n].copy_(to_device(index, idx.device))
        out[:n].copy_(tokens)  # fp32 -> transfer dtype, straight into the send buffer
        if n < self.wire.batch:
            out[n:].zero_()
        return buf

    def serve(self, batches: Mapping[int, Iterable], micro_batches: int | None = None,
              after_each: Callable[[int], None] | None = None) -> int:
        """Serves until a student's batches run out or `micro_batches` were sent to each;
        returns how many were. `batches`: {student_rank: iterable of micro-batches}, one per
        entry of data_shards. after_each(n) runs once the n-th micro-batch's targets are
        sent (the trainer joins the students' checkpoints there)."""
        if sorted(batches) != sorted(self.students):
            raise ConfigError(f"teacher rank {self.rank} serves {self.students}, "
                              f"got batches for {sorted(batches)}")
        iterators = {s: iter(batches[s]) for s in self.students}
        inflight: deque[tuple[torch.Tensor, object]] = deque()
        served = 0
        while micro_batches is None or served < micro_batches:
            try:
                group = [next(iterators[s]) for s in self.students]
            except StopIteration:
                break
            # One teacher pass for all served students: bigger batches run faster.
            images = torch.cat([b["teacher"] for b in group]).to(self.device, non_blocking=True)
            fused = self.method.teacher_targets(images)
            start = 0
            for s, b in zip(self.students, group):
                n = len(b["teacher"])
                buf = self._pack(fused[start:start + n], b.get("index"))
                start += n
                inflight.append((buf, dist.isend(buf, dst=s, group=self.stream)))
            # Bounded run-ahead: at most `prefetch` batches per student in flight.
            while len(inflight) > self.prefetch * len(self.students):
                self._sent(inflight.popleft()[1])
            served += 1
            if after_each is not None:
                after_each(served)
        end = self.wire.empty(self.comm_device)
        self.wire.indices(end).fill_(PAD)
        self.wire.indices(end)[0] = END
        for _ in range(self.prefetch):  # completes the receives each student keeps posted
            for s in self.students:
                inflight.append((end, dist.isend(end, dst=s, group=self.stream)))
        while inflight:  # delivered before this rank may exit and tear its group down
            self._sent(inflight.popleft()[1])
        return served

    def _sent(self, work) -> None:
        """Returns once a send has completed. Under NCCL, wait() only makes the current
        stream wait: the host would run ahead without bound and could exit with the last
        sends still queued."""
        work.wait()
        if self.comm_device.type == "cuda":
            while not work.is_completed():
                time.sleep(1e-4)

    def join_checkpoint(self, tag: str | None = None) -> None:
        """Matches the world-wide collectives of DeepSpeed's engine.save_checkpoint on the
        student ranks (DeepSpeed 0.19.8): dist.barrier(); with checkpoint tag validation on
        (DeepSpeed's default, "Warn"), all_reduce MAX and MIN of the tag's SHA-1 bytes; and
        a final dist.barrier(). Pass the tag the students use, or None when their config
        sets "checkpoint": {"tag_validation": "Ignore"}. load_checkpoint has no world-wide
        collective and needs nothing from teacher ranks."""
        dist.barrier()
        if tag is not None:
            digest = torch.tensor(list(hashlib.sha1(str(tag).encode()).digest()),
                                  dtype=torch.uint8, device=self.comm_device)
            dist.all_reduce(digest.clone(), op=dist.ReduceOp.MAX)
            dist.all_reduce(digest.clone(), op=dist.ReduceOp.MIN)
        dist.barrier()

    def close(self) -> None:
        pass
