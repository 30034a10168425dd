"""Cost versus number of teachers, from benchmarks/throughput.py results: Markdown + PNG.

    python benchmarks/report.py                                   # all throughput_*.json(.partial)
    python benchmarks/report.py benchmarks/results/throughput_gpu_cuda.json
    python benchmarks/report.py --merge benchmarks/results/throughput_gpu_cuda.json part*.json

Writes cost_vs_teachers_<name>.md and .png next to each throughput_<name>.json (one
report per result file: runs that share a preset and device, e.g. with the student
compiled or not, keep their own): images/s and peak memory against the number of
teachers, per student size, for the fast path and the reference step; the teacher-variant
evidence; the placement comparison with when a dedicated teacher rank pays off; and, for
GPU results, the issue's targets. A run cut short (complete: false, e.g. a .json.partial)
reports to cost_vs_teachers_<name>.partial.md/.png, beside the last complete report.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# Targets of the issue for one H100/H200, bf16, ViT-S student + 3 teachers, synthetic data.
TARGET_MFU, TARGET_SPEEDUP = 0.55, 1.5
SHORT_NAMES = {"vit_tiny_patch16_224": "ViT-T", "vit_small_patch16_224": "ViT-S",
               "vit_base_patch16_224": "ViT-B"}


def _fmt(x, digits=1, pct=False):
    if x is None:
        return "n/a"
    return f"{100 * x:.{digits}f}%" if pct else f"{x:,.{digits}f}"


def _ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}x"


def _main_data(result: dict) -> str:
    return result["config"]["data"][0] if result["config"]["data"] else "synthetic"


def _main_rows(result: dict) -> list[dict]:
    data = _main_data(result)
    return [r for r in result["rows"] if r["data"] == data and r["placement"] == "colocated"]


def _no_rows(result: dict) -> str:
    """Why the cost table and the plot are empty."""
    if not result["rows"]:
        return "no rows measured"
    return f"no colocated rows on {_main_data(result)} data"


def teacher_path_label(path: dict | None) -> str:
    """A fast row's teacher path in a few words: `loop`, `stacked +compile`, `loop +fp8`."""
    if not path:
        return "—"
    compile_ = path.get("compile")
    return " ".join([str(path.get("mode"))] + (["+compile"] if compile_ is True else [])
                    + ([f"+compile {compile_}"] if isinstance(compile_, str) else [])
                    + (["+fp8"] if path.get("fp8") else []))


def mfu_peak_tflops(row: dict) -> float | None:
    """The peak a row's MFU was computed against (achieved / MFU): the rows of a merged
    result come from parts that may have measured different peaks (a timed matmul on CPU)."""
    if row.get("mfu") and row.get("achieved_tflops"):
        return row["achieved_tflops"] / row["mfu"]
    return None


def _fast_with_teachers(result: dict) -> list[dict]:
    return [r for r in _main_rows(result) if r["path"] == "fast" and r["teachers"] > 0]


def row_teacher_paths(result: dict) -> list[str]:
    """The distinct teacher paths of the fast rows with teachers, as labels."""
    return list(dict.fromkeys(teacher_path_label(r.get("teacher_path"))
                              for r in _fast_with_teachers(result)))


def mfu_peaks(result: dict) -> list[float]:
    """The distinct peaks (TFLOP/s) in the result: the one its header states, then those
    its fast rows' MFU were computed against. More than one only in a merged result."""
    stated = result["peak_flops"]["flops"]
    peaks = [stated / 1e12] if stated else []
    for row in _main_rows(result):
        p = mfu_peak_tflops(row) if row["path"] == "fast" else None
        if p is not None and not any(math.isclose(p, q, rel_tol=1e-6) for q in peaks):
            peaks.append(p)
    return peaks


def mixed_provenance(result: dict) -> list[str]:
    """What the rows of one table do not share (parts of a merge): said in the header and
    the plot, and shown per row in the table."""
    mixed = []
    if len(row_teacher_paths(result)) > 1:
        mixed.append("mixed teacher paths")
    if len(mfu_peaks(result)) > 1:
        mixed.append("mixed MFU peaks")
    return mixed


def run_settings(result: dict) -> str:
    """What tells apart runs of one preset on one device: precision, student compilation,
    the teachers' path (FP8 included)."""
    cfg = result["config"]
    paths = row_teacher_paths(result) or [teacher_path_label(result.get("teacher_choice"))]
    teachers = paths[0] if len(paths) == 1 else "mixed"
    return (f"{cfg['precision']}, student {'compiled' if cfg.get('compile_student') else 'eager'}, "
            f"teachers {teachers}")


def cost_table(result: dict) -> list[str]:
    rows = _main_rows(result)
    if not rows:
        return [f"({_no_rows(result)}" + ("; the rows this run measured are in the step-time "
                                          "breakdown below)" if result["rows"] else ")")]
    show_peak = len(mfu_peaks(result)) > 1  # merged parts measured their own peak
    lines = ["| student | teachers | teacher path | fast img/s | reference img/s | speed-up "
             "| fast step ms | teacher share | cost / image vs 0 teachers "
             "| img/s lost per added teacher | fast mem GiB | ref mem GiB | MFU |"
             + (" MFU peak TFLOP/s |" if show_peak else ""),
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
             + ("---:|" if show_peak else "")]
    for s in dict.fromkeys(r["student_short"] for r in rows):
        fast = {r["teachers"]: r for r in rows if r["student_short"] == s and r["path"] == "fast"}
        ref = {r["teachers"]: r for r in rows if r["student_short"] == s
               and r["path"] == "reference"}
        base, previous = fast.get(0), None
        for m in sorted(fast):
            f, r = fast[m], ref.get(m)
            b = f["breakdown_ms"]
            share = b.get("teacher", 0) / f["step_ms"] if f["step_ms"] else None
            cost = base["images_per_s"] / f["images_per_s"] if base else None
            # Per teacher added since the previous measured count (0,3 -> the mean of three).
            lost = ((previous["images_per_s"] - f["images_per_s"]) / (m - previous["teachers"])
                    if previous else None)
            previous = f
            lines.append(
                f"| {s} | {m} | {teacher_path_label(f.get('teacher_path'))} | "
                f"{_fmt(f['images_per_s'])} | {_fmt(r['images_per_s']) if r else 'n/a'} | "
                f"{_ratio(f.get('speedup_vs_reference'))} | {_fmt(f['step_ms'])} | "
                f"{_fmt(share, 0, pct=True)} | {_ratio(cost)} | "
                f"{'—' if lost is None else _fmt(lost)} | {_fmt(f['peak_memory_gib'], 2)} | "
                f"{_fmt(r['peak_memory_gib'], 2) if r else 'n/a'} | "
                f"{_fmt(f.get('mfu'), 1, pct=True)} |"
                + (f" {_fmt(mfu_peak_tflops(f), 3)} |" if show_peak else ""))
    return lines


def cost_notes(result: dict) -> list[str]:
    rows = _main_rows(result)
    if not rows:
        return []
    notes = ["Teacher path = the fast step's teachers (the reference step runs timm's, at "
             "the reference precision). Teacher share = teacher-pass time / step time (fast "
             "path). Cost / image = time per image relative to the student alone. Img/s lost "
             "per added teacher = the fast path's images/s at the previous measured teacher "
             "count minus this row's, divided by the teachers added. Memory: "
             + next((r.get("memory_kind", "") for r in rows), "") + "."]
    students = dict.fromkeys(r["student_short"] for r in rows if r["path"] == "fast")
    no_base = [s for s in students if not any(r["student_short"] == s and r["teachers"] == 0
                                              and r["path"] == "fast" for r in rows)]
    if no_base:
        notes.append(f"No 0-teacher row for {', '.join(no_base)} in this result, so no cost "
                     "relative to the student alone (—).")
    if "mixed MFU peaks" in mixed_provenance(result):
        notes.append("The merged parts measured different peaks: each row's MFU is against "
                      "its own part's peak (MFU peak column).")
    return notes


def failed_cells_lines(result: dict) -> list[str]:
    """The cells that raised instead of giving a row: missing from the tables, named here."""
    failed = result.get("failed_cells") or []
    if not failed:
        return []
    return ["", f"**{len(failed)} cell(s) failed** (not in the tables):", ""] + [
        f"- {c['student']} + {c['teachers']} teachers, data {c['data']}: {c['error']}"
        for c in failed]


def breakdown_table(result: dict) -> list[str]:
    if not result["rows"]:
        return ["(no rows measured)"]
    lines = ["| student | teachers | data | path | batch | data ms | teacher ms | student fwd+bwd ms "
             "| optimizer ms | other ms | step ms | img/s | phases ms per step: min / median / max |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        b = r["breakdown_ms"]
        lines.append(f"| {r['student_short']} | {r['teachers']} | {r['data']} | {r['path']} | "
                     f"{r['micro_batch']} | {b.get('data', 0):.1f} | {b.get('teacher', 0):.1f} | "
                     f"{b.get('student', 0):.1f} | {b.get('optimizer', 0):.1f} | "
                     f"{b.get('other', 0):.1f} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | "
                     f"{_spread(r.get('phases_ms_per_step'))} |")
    return lines + ["", "The last column is the spread over the measured steps of data wait + "
                        "teacher + student + optimizer: a wide one says the machine was busy "
                        "(compare rows against it, not to the last digit)."]


def _spread(spread: dict | None) -> str:
    if not spread:
        return "—"  # results measured before the spread was recorded
    return f"{spread['min']:.1f} / {spread['median']:.1f} / {spread['max']:.1f}"


def variants_table(result: dict) -> list[str]:
    variants = result.get("teacher_variants") or []
    if not variants:
        return ["(not measured in this run)"]
    lines = ["| teachers | variant | batch | ms / batch | img/s | vs reference | first call s "
             "| target KL vs loop (nats/token) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for m in sorted({v["teachers"] for v in variants}):
        group = [v for v in variants if v["teachers"] == m]
        ref = next((v for v in group if v["mode"] == "reference"), None)
        for v in group:
            if "error" in v or "skipped" in v:
                why = f"failed: {v['error'][:80]}" if "error" in v else f"skipped: {v['skipped']}"
                lines.append(f"| {m} | {v['variant']} | | {why} | | | | |")
                continue
            ratio = ref["ms"] / v["ms"] if ref else None
            kl = f"{v['target_kl']:.1e}" if "target_kl" in v else ""
            lines.append(f"| {m} | {v['variant']} | {v['micro_batch']} | {v['ms']:.1f} | "
                         f"{v['images_per_s']:.1f} | {_ratio(ratio)} | "
                         f"{v['first_call_s']:.1f} | {kl} |")
    choice = result.get("teacher_choice") or {}
    lines.append("")
    lines.append(f"Chosen for the matrix: mode `{choice.get('mode')}`, compile "
                 f"`{choice.get('compile')}`, fp8 `{choice.get('fp8', False)}` "
                 f"({choice.get('why')})."
                 + (" Merged result: each row's own teacher path is in the cost table."
                    if result.get("parts") else ""))
    return lines


def placement_section(result: dict) -> list[str]:
    rows = result.get("placement_rows") or []
    lines = []
    if rows:
        lines += ["| placement | ranks | student | teachers | batch / rank | img/s (all ranks) "
                  "| img/s per rank | targets ms on a student rank (colocated: teacher pass; "
                  "dedicated: wait) | peak mem / student rank GiB | peak mem / teacher rank GiB |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['placement']} | {r['teacher_ranks']}T + {r['student_ranks']}S | "
                         f"{r['student_short']} | {r['teachers']} | {r['micro_batch']} | "
                         f"{r['images_per_s']:.1f} | {r['images_per_s_per_rank']:.1f} | "
                         f"{r['breakdown_ms'].get('teacher', 0):.1f} | "
                         f"{r['peak_memory_gib']:.2f} | "
                         f"{_fmt(r.get('teacher_rank_peak_memory_gib'), 2)} |")
    else:
        lines.append("(not measured in this run)")
    # The arithmetic of the trade-off, from the colocated breakdown of the same cell.
    cell = result["config"].get("dedicated_cell", "")
    fast = [r for r in _main_rows(result) if r["path"] == "fast" and r["teachers"] > 0]
    if fast:
        student, m = cell.split(":") if ":" in cell else ("", "0")
        pick = next((r for r in fast if r["student_short"].endswith(f"-{student}")
                     and r["teachers"] == int(m)), fast[-1])
        b = pick["breakdown_ms"]
        t_teacher = b.get("teacher", 0)
        t_student = b.get("student", 0) + b.get("optimizer", 0)
        lines += ["", f"From the colocated breakdown of {pick['student_short']} + "
                      f"{pick['teachers']} teachers (batch {pick['micro_batch']}): teacher pass "
                      f"{t_teacher:.1f} ms, student step {t_student:.1f} ms per batch. A "
                      f"dedicated layout keeps every rank busy at teacher:student ranks = "
                      f"{t_teacher / max(t_student, 1e-9):.2f} : 1; at that ratio its "
                      "throughput per rank equals colocated's, minus transfer and plus "
                      "pipelining. It pays off when colocated ranks lose something the split "
                      "avoids: memory (teachers' weights and activations limit the student's "
                      "micro-batch), cheaper or inference-only accelerators for teachers, or "
                      "a teacher batch that runs more efficiently when several students' "
                      "batches are fused."]
        if rows:
            mb = rows[-1].get("targets_mb_per_image")
            per_s = max(r["images_per_s"] / r["student_ranks"] for r in rows)  # per student rank
            lines.append(f"Transfer: {mb:.3f} MB of bf16 targets per image; a student rank "
                         f"at {per_s:.0f} img/s needs {mb * per_s:.1f} MB/s from its teacher "
                         "rank.")
    return lines


def targets_section(result: dict) -> list[str]:
    machine = result["machine"]
    if machine.get("device_type") != "cuda":
        return ["CPU result: the GPU targets (>= 55% MFU with 3 teachers, >= 1.5x the reference "
                "step, ViT-S student, bf16, synthetic data) are to be measured on an H100/H200 "
                "with `--preset gpu`."]
    rows = [r for r in _main_rows(result) if r["student_short"] == "ViT-S"
            and r["teachers"] == 3 and r["path"] == "fast"]
    if not rows:
        return ["ViT-S + 3 teachers not in this run."]
    r = rows[0]
    mfu_ok = r["mfu"] is not None and r["mfu"] >= TARGET_MFU
    sp_ok = (r.get("speedup_vs_reference") or 0) >= TARGET_SPEEDUP
    return [f"- MFU {_fmt(r['mfu'], 1, pct=True)} (target >= {TARGET_MFU:.0%}): "
            f"{'met' if mfu_ok else 'NOT met'}",
            f"- speed-up {_fmt(r.get('speedup_vs_reference'), 2)}x (target >= "
            f"{TARGET_SPEEDUP}x): {'met' if sp_ok else 'NOT met'}",
            f"- micro-batch {r['micro_batch']}, teacher path "
            f"{teacher_path_label(r.get('teacher_path'))}, step breakdown {r['breakdown_ms']} ms"]


def profile_section(result: dict) -> list[str]:
    prof = result.get("profile")
    if not prof:
        return ["(not profiled in this run: `--profile STUDENT:TEACHERS`)"]
    busy = (f", GPU busy {100 * prof['device_busy']:.0f}% of the step"
            if prof.get("device_busy") is not None else "")
    lines = [f"{SHORT_NAMES.get(prof['student'], prof['student'])} + {prof['teachers']} teachers, "
             f"micro-batch {prof['micro_batch']}, {prof['steps']} steps: "
             f"{prof['wall_ms_per_step']:.1f} ms per step wall, {prof['busy_ms_per_step']:.1f} ms "
             f"of {prof['time_kind']}{busy}.", "",
             "| kind | ms / step | share |", "|---|---:|---:|"]
    total = prof["busy_ms_per_step"] or 1.0
    for kind, ms in prof["by_category_ms"].items():
        lines.append(f"| {kind} | {ms:.1f} | {100 * ms / total:.0f}% |")
    lines += ["", "| top operators | kind | ms / step | calls / step |", "|---|---|---:|---:|"]
    for op in prof["top_ops"][:10]:
        name = op["name"].replace("|", "/")
        lines.append(f"| `{name[:70]}` | {op['category']} | {op['ms_per_step']:.2f} | "
                     f"{op['calls_per_step']:.0f} |")
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = _main_rows(result)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    students = list(dict.fromkeys(r["student_short"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(students):
        for path_name, style in (("fast", "-o"), ("reference", "--s")):
            pts = sorted((r["teachers"], r["images_per_s"], r["peak_memory_gib"]) for r in rows
                         if r["student_short"] == s and r["path"] == path_name)
            if not pts:
                continue
            xs, ips, mem = zip(*pts)
            label = f"{s} {path_name}"
            ax1.plot(xs, ips, style, color=colors[i % len(colors)], label=label)
            ax2.plot(xs, mem, style, color=colors[i % len(colors)], label=label)
    teacher = result["config"]["teacher_arch"]
    kind = rows[0].get("memory_kind", "") if rows else ""
    memory_unit = "GiB, CUDA allocated" if "cuda" in kind else "GiB, host allocated"
    for ax, title, unit in ((ax1, "throughput", "images / s"),
                            (ax2, "peak memory", memory_unit)):
        ax.set_xlabel(f"number of teachers ({teacher})")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.set_xticks(sorted({r["teachers"] for r in rows}))
        ax.grid(alpha=0.3)
        if not rows:
            ax.text(0.5, 0.5, _no_rows(result), ha="center", va="center",
                    transform=ax.transAxes)
    if rows:
        ax1.set_yscale("log")
        ax1.legend(fontsize=8)
    m = result["machine"]
    marks = (["INCOMPLETE RUN"] if not result.get("complete", True) else []) + \
        mixed_provenance(result)
    fig.suptitle(f"DMT cost vs teachers - {m.get('gpu') or m.get('cpu')} - "
                 f"{result['config']['img_size']} px, {run_settings(result)}"
                 + (f"\n{', '.join(marks).upper()} (see the report)" if marks else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# What a report reads from a result: a file that lacks one is refused, naming the field.
REQUIRED = {"": ("preset", "command", "timestamp", "wall_s", "machine", "config", "peak_flops",
                 "rows"),
            "machine": ("device_type",),
            "config": ("img_size", "teacher_arch", "precision", "reference_precision",
                       "zero_stage", "micro_batch", "steps", "warmup", "data"),
            "peak_flops": ("flops", "source")}
ROW_FIELDS = ("student", "student_short", "teachers", "placement", "data", "path",
              "micro_batch", "images_per_s", "step_ms", "breakdown_ms", "peak_memory_gib")


# Row values the tables and plots compute with (a hand-edited null or string in one of
# them was a matplotlib or TypeError traceback).
ROW_NUMBERS = {"micro_batch": int, "teachers": int, "images_per_s": float, "step_ms": float,
               "peak_memory_gib": float}


def field_problem(result: dict) -> str | None:
    """What is wrong with the first field the report needs, e.g. 'config.img_size is
    missing' or 'rows[2].images_per_s is None, not a number'."""
    if missing := missing_field(result):
        return f"{missing} is missing"
    for i, row in enumerate(result["rows"]):
        for name, kind in ROW_NUMBERS.items():
            value = row[name]
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value) and (kind is float or isinstance(value, int)))
            if not ok:
                want = "an integer" if kind is int else "a finite number"
                return f"rows[{i}].{name} is {value!r}, not {want}"
    return None


def missing_field(result: dict) -> str | None:
    """The first field the report needs that `result` lacks, e.g. 'config.img_size'."""
    for section, fields in REQUIRED.items():
        where = result[section] if section else result
        if not isinstance(where, dict):
            return f"{section} (not an object)"
        for name in fields:
            if name not in where:
                return f"{section}.{name}" if section else name
    if not isinstance(result["rows"], list):
        return "rows (not a list)"
    for i, row in enumerate(result["rows"]):
        if not isinstance(row, dict):
            return f"rows[{i}] (not an object)"
        if lacking := [f for f in ROW_FIELDS if f not in row]:
            return f"rows[{i}].{lacking[0]}"
    return None


class NotThroughput(Exception):
    """A JSON file that is not a benchmarks/throughput.py result (e.g. a dataloader one)."""


def load_result(path: Path | str) -> dict:
    """A throughput result; a missing or damaged file ends the script with one line
    naming it."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        sys.exit(f"{path}: no such file")
    except OSError as err:
        sys.exit(f"{path}: {err.strerror or err}")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        sys.exit(f"{path}: not a valid JSON file ({err}); a run cut short keeps what it "
                 "measured in <name>.json.partial")
    if not isinstance(result, dict) or result.get("benchmark") != "throughput":
        kind = result.get("benchmark") if isinstance(result, dict) else None
        raise NotThroughput(f"{path}: not a benchmarks/throughput.py result"
                            + (f" (a {kind} result)" if kind else ""))
    if problem := field_problem(result):
        sys.exit(f"{path}: not a complete throughput result: field {problem}")
    return result


def report_path(json_path: Path, result: dict) -> Path:
    """cost_vs_teachers_<name>.md beside throughput_<name>.json: one report per result
    file. A run cut short reports to <...>.partial.md, beside the last complete report."""
    name = json_path.name
    partial = name.endswith(".partial") or not result.get("complete", True)
    name = name.removesuffix(".partial").removesuffix(".json").removeprefix("throughput_")
    return json_path.parent / f"cost_vs_teachers_{name}{'.partial' if partial else ''}.md"


def settings_line(result: dict) -> str:
    cfg, choice = result["config"], result.get("teacher_choice") or {}
    paths = row_teacher_paths(result)
    if len(paths) > 1:
        teachers = f"**differs per row** ({'; '.join(paths)}): see the cost table"
    else:
        teachers = (f"{paths[0] if paths else teacher_path_label(choice)}: "
                    f"{choice.get('why', 'no teacher rows')}")
    return (f"- settings: student compiled {'on' if cfg.get('compile_student') else 'off'}, "
            f"teacher FP8 {'on' if cfg.get('teacher_fp8') else 'off'}, teacher path "
            f"{teachers}; asked for teacher mode {cfg.get('teacher_mode', 'auto')}, teacher "
            f"compile {cfg.get('teacher_compile', 'auto')}")


def peak_line(result: dict) -> str:
    stated = (f"{result['peak_flops']['source']} = "
              f"{(result['peak_flops']['flops'] or 0) / 1e12:.3f} TFLOP/s")
    if len(mfu_peaks(result)) > 1:
        return (f"- peak for MFU: **differs per row** (each merged part measured its own; the "
                f"first part's: {stated}): see the cost table's MFU peak column")
    return f"- peak for MFU: {stated}"


def write_report(result: dict, md: Path) -> tuple[Path, Path]:
    png = md.with_suffix(".png")
    plot(result, png)
    m, cfg = result["machine"], result["config"]
    device = m["device_type"]
    versions = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v)
    incomplete = "" if result.get("complete", True) else " — INCOMPLETE RUN"
    lines = [
        f"# DMT cost versus number of teachers ({result['preset']} preset, {device}; "
        f"{run_settings(result)}){incomplete}", "",
        f"- machine: {m.get('gpu') or m.get('cpu')}"
        + (f" ({m.get('gpu_memory_gib')} GiB)" if m.get("gpu") else
           f", {m.get('cpu_cores')} cores, {m.get('memory_gib')} GiB, torch threads "
           f"{cfg.get('threads') or m.get('torch_threads')}, load average at start "
           f"{m.get('load_average_at_start')}"),
        f"- software: {versions}",
        f"- command: `{result['command']}` ({result['timestamp']}, {result['wall_s']} s)"
        if not result.get("parts") else
        f"- {len(result['parts'])} runs merged ({result['wall_s']} s in all): " + "; ".join(
            f"`{part['command']}` ({part['config']['steps']} steps after "
            f"{part['config']['warmup']})" for part in result["parts"]),
        f"- shapes: {cfg['img_size']} px, teachers {cfg['teacher_arch']}, precision "
        f"{cfg['precision']} (reference: {cfg['reference_precision']}"
        f"{' autocast' if cfg['reference_precision'] != 'fp32' else ''}), ZeRO stage "
        f"{cfg['zero_stage']}, micro-batch {cfg['micro_batch']}, {cfg['steps']} measured steps "
        f"after {cfg['warmup']}",
        settings_line(result),
        peak_line(result),
    ]
    if result.get("matmul_rates"):
        lines.append("- matmul rates (GFLOP/s, 512x512): " + ", ".join(
            f"{k} {v['gflops']}" for k, v in result["matmul_rates"].items()))
    lines += ["", f"![cost vs teachers]({png.name})", "",
              "## Cost versus number of teachers", ""] + cost_table(result)
    lines += [x for note in cost_notes(result) for x in ("", note)]
    lines += failed_cells_lines(result)
    lines += ["", "## Teacher execution variants (teacher pass + fusion only)", ""]
    lines += variants_table(result)
    lines += ["", "## Placements on the same hardware", ""] + placement_section(result)
    lines += ["", "## Targets", ""] + targets_section(result)
    lines += ["", "## Where the time goes (torch.profiler)", ""] + profile_section(result)
    lines += ["", "## Step-time breakdown (every row)", ""] + breakdown_table(result)
    if not result.get("complete", True):
        lines += ["", "**Incomplete run**: the benchmark stopped before the end; the tables "
                      "hold what it measured until then."]
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    md.write_text("\n".join(lines) + "\n")
    return md, png


# Settings that change every row's speed: parts measured otherwise do not mix.
_SAME_IN_ALL_PARTS = ("img_size", "precision", "reference_precision", "teacher_arch",
                      "zero_stage", "micro_batch", "threads", "compile_student", "teacher_fp8")


def _key(kind: str, item: dict) -> tuple:
    if kind == "rows":  # a cell: its fast and reference rows move together
        return (item["student"], item["teachers"], item.get("teacher_arch"), item["placement"],
                item["data"])
    if kind == "teacher_variants":
        return (item["teachers"], item["variant"])
    return (item["placement"], item.get("teacher_ranks"), item.get("student_ranks"),
            item["student"], item["teachers"])


def _failed_key(cell: dict) -> tuple:
    return cell["student"], cell["teachers"], cell["data"]


def merge_results(parts: list[dict]) -> dict:
    """One result from runs of parts of the matrix on one machine (a long matrix split into
    jobs that each fit a time limit). A later part replaces an earlier part's row for the
    same cell; each part's command, configuration and duration are kept under "parts"."""
    first = parts[0]
    for part in parts[1:]:
        for field in ("gpu", "cpu", "device_type"):  # as benchmarks.common, without torch
            if part["machine"].get(field) != first["machine"].get(field):
                raise SystemExit(f"cannot merge results of different machines: {field} "
                                 f"{first['machine'].get(field)!r} vs {part['machine'].get(field)!r}")
        for key in _SAME_IN_ALL_PARTS:
            if part["config"].get(key) != first["config"].get(key):
                raise SystemExit(f"cannot merge results with different {key}: "
                                 f"{first['config'].get(key)!r} vs {part['config'].get(key)!r}")
    merged = dict(first)
    for kind in ("rows", "teacher_variants", "placement_rows"):
        by_key: dict[tuple, list[dict]] = {}
        for part in parts:
            fresh: dict[tuple, list[dict]] = {}
            for item in part.get(kind) or []:
                fresh.setdefault(_key(kind, item), []).append(item)
            by_key.update(fresh)  # a later part replaces whole cells
        merged[kind] = [item for items in by_key.values() for item in items]
    # A cell that failed in one part and was measured in another keeps its rows.
    measured = {_failed_key(r) for r in merged["rows"]}
    failed = {_failed_key(c): c for part in parts for c in part.get("failed_cells") or []}
    merged["failed_cells"] = [c for key, c in failed.items() if key not in measured]
    with_variants = [p for p in parts if p.get("teacher_variants")]
    merged["teacher_choice"] = (with_variants or parts)[-1].get("teacher_choice")
    merged["profile"] = next((p["profile"] for p in reversed(parts) if p.get("profile")), None)
    merged["notes"] = list(dict.fromkeys(n for p in parts for n in p.get("notes", [])))
    for field in ("versions", "git_commit"):
        if any(p["machine"].get(field) != first["machine"].get(field) for p in parts):
            merged["notes"].append(f"the merged parts differ in {field}: see parts[].")
    merged["complete"] = all(p.get("complete", True) for p in parts)
    merged["wall_s"] = round(sum(p["wall_s"] for p in parts), 1)
    merged["command"] = " && ".join(p["command"] for p in parts)
    merged["parts"] = [{**{k: p[k] for k in ("command", "timestamp", "wall_s", "config")},
                        "peak_flops": p.get("peak_flops"),
                        "versions": p["machine"].get("versions"),
                        "git_commit": p["machine"].get("git_commit")} for p in parts]
    return merged


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="*", help="throughput JSON files (default: all in "
                                              "benchmarks/results/)")
    p.add_argument("--merge", metavar="OUT.json",
                   help="merge the given results (parts of one matrix, same machine) into "
                        "OUT.json and report that")
    a = p.parse_args(argv)
    if a.merge:
        if not a.results:
            sys.exit("--merge needs the part files to merge")
        try:
            merged = merge_results([load_result(x) for x in a.results])
        except NotThroughput as err:
            sys.exit(f"cannot merge {err}")
        write_merged(merged, Path(a.merge))
        print(f"merged {len(a.results)} result(s) into {a.merge}")
        a.results = [a.merge]
    # By default every result in benchmarks/results/, and the rows of runs cut short.
    paths = [Path(x) for x in a.results] or sorted(
        [*RESULTS.glob("throughput_*.json"), *RESULTS.glob("throughput_*.json.partial")])
    if not paths:
        sys.exit(f"no throughput results in {RESULTS}: run benchmarks/throughput.py first")
    reports, skipped = {}, []  # report -> (result file, result), before anything is written
    for path in paths:
        try:
            result = load_result(path)
        except NotThroughput as err:  # e.g. results/*.json, which holds dataloader results
            skipped.append(str(err))
            continue
        md = report_path(path, result)
        earlier = reports.get(md.resolve())
        if earlier and earlier[0].resolve() == path.resolve():
            continue  # the same file given twice
        if earlier:
            sys.exit(f"{earlier[0]} and {path} would both write {md}: rename one of them (a "
                     "report is named after its result file)")
        reports[md.resolve()] = (path, result, md)
    written = []
    for _, result, md in reports.values():
        md, png = write_report(result, md)
        print(f"wrote {md} and {png}")
        written += [md, png]
    for reason in skipped:
        print(f"skipped {reason}")
    if not written:
        sys.exit("no throughput results among the files given")
    return written


def write_merged(merged: dict, out: Path) -> None:
    """OUT.json whole or not at all; its folder is made, as throughput.py's --out does."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(merged, indent=2) + "\n")
        tmp.replace(out)  # never a half-written result
    except OSError as err:
        sys.exit(f"--merge {out}: cannot write it ({err.strerror or err})")


if __name__ == "__main__":
    main()
