"""Which global rank does what when some ranks only run teachers."""
from __future__ import annotations

from dataclasses import dataclass

from dmt.errors import ConfigError


@dataclass(frozen=True)
class RankLayout:
    """W ranks: the first S = W - T are students, the last T are teachers.

    Students come first so that global rank 0 is a student: DeepSpeed writes the 'latest'
    checkpoint file, logs and broadcasts from global rank 0, and a student's data shard
    is its global rank. Student s is served by teacher s % T.
    """

    world_size: int
    teacher_ranks: int

    def __post_init__(self):
        if self.teacher_ranks < 1:
            raise ConfigError("the dedicated placement needs teacher_ranks >= 1")
        if self.teacher_ranks > self.num_students:
            raise ConfigError(
                f"teacher_ranks={self.teacher_ranks} of world size {self.world_size} leaves "
                f"{self.num_students} student ranks: every teacher rank must serve at least "
                "one student rank (teacher_ranks <= world_size / 2)")

    @property
    def num_students(self) -> int:
        return self.world_size - self.teacher_ranks

    @property
    def student_ranks(self) -> list[int]:
        return list(range(self.num_students))

    def is_teacher(self, rank: int) -> bool:
        return rank >= self.num_students

    def teacher_of(self, student_rank: int) -> int:
        return self.num_students + student_rank % self.teacher_ranks

    def students_of(self, teacher_rank: int) -> list[int]:
        j = teacher_rank - self.num_students
        return [s for s in self.student_ranks if s % self.teacher_ranks == j]
