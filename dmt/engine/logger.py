"""What a run reports: JSON lines per step, a rich progress bar, optional TensorBoard,
and a one-screen summary. Only rank 0 writes; values arrive already reduced."""
from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from dmt.errors import storage_error


def drop_rows_after(metrics_file: Path, step: int) -> int:
    """Keep the metrics of steps 1..step only: a run restarted from its checkpoint at
    `step` (or afresh, 0) redoes the later steps, whose old rows would otherwise appear
    twice. A line cut short by a crash goes too. Returns how many lines were dropped."""
    if not metrics_file.is_file():
        return 0
    lines = metrics_file.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    if len(kept) < len(lines):
        tmp = metrics_file.with_name(f".{metrics_file.name}.tmp")
        try:
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, metrics_file)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise storage_error(metrics_file, err, "the metrics") from None
    return len(lines) - len(kept)


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, enabled: bool, progress: bool,
                 tensorboard: bool, start_step: int = 0, metrics: bool = True):
        self.enabled = enabled
        # soft_wrap: a message stays one line (a terminal wraps it itself), so a job's log
        # file can be searched for it; rich would break it at 80 columns there.
        self.console = Console(soft_wrap=True)
        self.progress = None
        self.tb = None
        self.metrics = None
        if not enabled:
            return
        if metrics:
            drop_rows_after(run_dir / "metrics.jsonl", start_step)
            self.metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if progress and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[ips]} img/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                               epoch=0, loss="-", ips="-")
            self.progress.start()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard hides the events of steps redone after a restart
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)

    def warn(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[bold yellow]WARNING[/] {message}")

    def advance(self, epoch: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, epoch=epoch)

    def log_steps(self, records: list[dict]) -> None:
        if not self.enabled or not records:
            return
        for record in records:
            try:
                self.metrics.write(json.dumps(record) + "\n")
            except OSError as err:  # rows of earlier steps stay; a resume drops a cut row
                raise storage_error(self.metrics.name, err, "the metrics") from None
            if self.tb is not None:
                for key, value in record.items():
                    if isinstance(value, float):
                        self.tb.add_scalar(f"train/{key}", value, record["step"])
        last = records[-1]
        if self.progress is not None:
            self.progress.update(self.task, loss=f"{last['loss']:.4f}",
                                 ips=f"{last['img_per_s']:.1f}")
        else:  # no terminal (batch jobs, CI): a plain line per flush
            norm = "" if last.get("grad_norm") is None else f" grad_norm {last['grad_norm']:.3g}"
            self.console.print(f"step {last['step']}/{last['total_steps']} epoch {last['epoch']} "
                               f"loss {last['loss']:.4f} lr {last['lr']:.3g}{norm} "
                               f"{last['img_per_s']:.1f} img/s", highlight=False)

    def summary(self, rows: dict) -> None:
        if not self.enabled:
            return
        self.close_progress()
        table = Table(title="dmt run summary", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(overflow="fold")  # a long path wraps in its cell, whole
        for key, value in rows.items():
            table.add_row(key, str(value))
        self.console.print(table, soft_wrap=False)

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def close(self) -> None:
        if not self.enabled:
            return
        self.close_progress()
        if self.metrics is not None:
            self.metrics.close()
        if self.tb is not None:
            self.tb.close()
