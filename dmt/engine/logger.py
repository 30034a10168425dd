"""What a run reports: JSON lines per step, a rich progress bar, optional TensorBoard,
and a one-screen summary. Only rank 0 writes; values arrive already reduced."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, enabled: bool, progress: bool,
                 tensorboard: bool, start_step: int = 0):
        self.enabled = enabled
        self.console = Console()
        self.progress = None
        self.tb = None
        if not enabled:
            return
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
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

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
            self.metrics.write(json.dumps(record) + "\n")
            if self.tb is not None:
                for key, value in record.items():
                    if isinstance(value, float):
                        self.tb.add_scalar(f"train/{key}", value, record["step"])
        last = records[-1]
        if self.progress is not None:
            self.progress.update(self.task, loss=f"{last['loss']:.4f}",
                                 ips=f"{last['img_per_s']:.1f}")
        else:  # no terminal (batch jobs, CI): a plain line per flush
            self.console.print(f"step {last['step']}/{last['total_steps']} epoch {last['epoch']} "
                               f"loss {last['loss']:.4f} lr {last['lr']:.3g} "
                               f"{last['img_per_s']:.1f} img/s", highlight=False)

    def summary(self, rows: dict) -> None:
        if not self.enabled:
            return
        self.close_progress()
        table = Table(title="dmt run summary", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows.items():
            table.add_row(key, str(value))
        self.console.print(table)

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def close(self) -> None:
        if not self.enabled:
            return
        self.close_progress()
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()
