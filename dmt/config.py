"""Experiment configuration: defaults + experiment YAML + dotted command-line overrides.

Everything is checked before any model is built, so a typo costs a second, not a
cluster allocation.
"""
from __future__ import annotations

import copy
import difflib
import errno
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from dmt import choices
from dmt.choices import COMPILE_MODES, DATA_PATH, TEACHER_KINDS, loads_checkpoint
from dmt.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"

# Types of the keys whose default (null, or a list) does not say it.
_DECLARED_TYPES: dict[str, tuple[type, ...]] = {
    "run.max_steps": (int,),
    "data.path": (str, int),  # int: the synthetic backend's sample count
    "optim.lr": (float, int),
    "optim.clip_grad": (float, int),
    "method.teachers": (list,),
    "teacher_runtime.compile": (bool, str),
    "data.probe_cache": (str, bool),  # YAML reads a bare `off` as false
}
TEACHER_DEFAULTS = {"name": None, "kind": None, "checkpoint": None,
                    "arch": "vit_base_patch16_224", "weight": 1.0}
_CHOICES = {
    "model.adapter": choices.ADAPTERS,
    "teacher_runtime.dtype": choices.DTYPES,
    "teacher_runtime.placement": choices.PLACEMENTS,
    "teacher_runtime.stack": choices.STACK,
    "teacher_runtime.transfer_dtype": choices.DTYPES,
    "method.name": choices.METHODS,
    "method.distance": choices.DISTANCES,
    "method.direction": choices.DIRECTIONS,
    "method.fusion": choices.FUSIONS,
    "data.backend": choices.BACKENDS,
}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}' in {where}{hint}")


def _merge(base: dict, update: dict, where: str, prefix: str = "") -> None:
    """Merges `update` into `base` in place; keys must already exist in `base`."""
    known = list(flatten(base)) + [k for k, v in base.items()]
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise _unknown_key(dotted, [f"{prefix}{k}" for k in base] + known, where)
        if isinstance(base[key], dict) and isinstance(value, dict):
            _merge(base[key], value, where, dotted + ".")
        else:
            base[key] = value


def _set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    """Sets a.b.c (list items by index: teachers.0.checkpoint)."""
    node: Any = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override '{dotted}': '{part}' is not an index of a "
                                  f"list of {len(node)}")
            part = int(part)
        elif not isinstance(node, dict) or part not in node:
            parent = ".".join(parts[:i])
            keys = [f"{parent}.{k}" if parent else k for k in (node if isinstance(node, dict) else [])]
            raise _unknown_key(dotted, keys + list(flatten(cfg)), "command-line overrides")
        if last:
            node[part] = value
        else:
            node = node[part]


class _Loader(yaml.SafeLoader):
    """YAML as users write numbers: YAML 1.1 (PyYAML) reads 1e-6, with no dot, as a string."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def _load_yaml(stream, source: str = "config", prefix: str = ""):
    """yaml.load with _Loader, refusing duplicate keys (PyYAML keeps the last one silently).
    source and prefix (the dotted key above the document) name a duplicate in the error."""
    loader = _Loader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, source, prefix)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node: yaml.Node, source: str, path: str = "",
                           seen: set[int] | None = None) -> None:
    """One ConfigError for the first key that a mapping, at any depth, holds twice."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already walked (or a recursive one)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, source, f"{path}{i}.", seen)
    elif isinstance(node, yaml.MappingNode):
        first: dict[str, yaml.Mark] = {}
        for key_node, value_node in node.value:
            # `<<: *anchor` merges keys that the mapping's own keys may override, as YAML means
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key, mark = key_node.value, key_node.start_mark
                if key in first:
                    was = first[key]
                    where = (f"lines {was.line + 1} and {mark.line + 1}" if was.line != mark.line
                             else f"line {mark.line + 1}, columns {was.column + 1} and "
                                  f"{mark.column + 1}")
                    raise ConfigError(f"{source}: duplicate key '{path}{key}' ({where}); YAML "
                                      "would keep only the last one: merge them into one")
                first[key] = mark
                _refuse_duplicate_keys(value_node, source, f"{path}{key}.", seen)
            else:
                _refuse_duplicate_keys(value_node, source, path, seen)


def parse_override(arg: str) -> tuple[str, Any]:
    """One `key.sub=value`. The same key given twice: the later override wins, as usual."""
    if "=" not in arg:
        raise ConfigError(f"override '{arg}' must look like key.sub=value")
    key, raw = arg.split("=", 1)
    try:
        value = _load_yaml(raw, f"override '{arg}'", key.strip() + ".") if raw != "" else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{arg}': cannot parse value: {err}") from err
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """Defaults, then the experiment file, then `key=value` overrides; then validation."""
    with open(DEFAULT_CONFIG) as f:
        cfg = _load_yaml(f, str(DEFAULT_CONFIG))
    defaults = flatten(cfg)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}" if not path.exists() else
                              f"config file {path} is not a regular file")
        with open(path, "rb") as f:  # bytes: PyYAML reports an encoding it cannot read
            try:
                experiment = _load_yaml(f, str(path)) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(experiment, dict):
            raise ConfigError(f"{path} must hold a mapping of config sections (run:, model:, "
                              f"...), got a {type(experiment).__name__}")
        _merge(cfg, experiment, str(path))
    cfg["teachers"] = _teacher_entries(cfg["teachers"])  # so teachers.0.arch=... can be set
    for arg in overrides:
        key, value = parse_override(arg)
        _set_dotted(cfg, key, value)
    cfg["teachers"] = _teacher_entries(cfg["teachers"])  # a whole new list may have come in
    validate(cfg, defaults)
    return cfg


def _teacher_entries(entries: Any) -> list[dict]:
    if not isinstance(entries, list):
        raise ConfigError(f"'teachers' must be a list of mappings, got {entries!r}")
    return [_teacher_entry(t, i) for i, t in enumerate(entries)]


def _teacher_entry(entry: Any, index: int) -> dict:
    if not isinstance(entry, dict):
        raise ConfigError(f"teachers[{index}] must be a mapping with kind and checkpoint, "
                          f"got {entry!r}")
    unknown = [k for k in entry if k not in TEACHER_DEFAULTS]
    if unknown:
        raise _unknown_key(f"teachers[{index}].{unknown[0]}",
                           [f"teachers[{index}].{k}" for k in TEACHER_DEFAULTS], "teachers")
    full = {**TEACHER_DEFAULTS, **entry}
    if full["kind"] not in TEACHER_KINDS:
        raise ConfigError(f"teachers[{index}].kind must be one of {TEACHER_KINDS}, "
                          f"got {full['kind']!r}")
    full["name"] = str(full["name"] or full["kind"])
    return full


def _spelling_hint(value: Any, expected: tuple[type, ...]) -> str:
    """For 'nan' or 'inf' given where a float belongs: YAML reads those as text. (Not for
    a bool or int key, where no spelling of them would do.)"""
    if float in expected and isinstance(value, str) \
            and value.strip().lstrip("+-").lower() in ("nan", "inf", "infinity"):
        return " (YAML reads nan and inf as text; a number is needed)"
    return ""


def _finite_number(value: Any) -> bool:
    """An int, or a float that is neither infinite nor NaN (bools are not numbers here)."""
    return _type_ok(value, (float, int)) and not (isinstance(value, float)
                                                   and not math.isfinite(value))


def _type_ok(value: Any, expected: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int in Python; never accept it for numbers
        return bool in expected
    return isinstance(value, expected)


# Counters that make no sense below a bound (a zero would divide by zero or stop at once).
_AT_LEAST = {"run.epochs": 1, "run.max_steps": 1, "run.log_every": 1, "run.checkpoint_every": 1,
             "run.keep_last": 1, "run.max_nonfinite": 1, "model.img_size": 16,
             "data.num_workers": 0, "data.sample_images": 0, "teacher_runtime.teacher_ranks": 0,
             "teacher_runtime.prefetch": 1,
             "optim.warmup_epochs": 0, "optim.min_lr": 0, "optim.weight_decay": 0,
             "optim.clip_grad": 0}
# Values a zero makes meaningless: a peak lr of 0 trains nothing.
_POSITIVE = ("optim.base_lr", "optim.lr")


def _expected_type(key: str, default: Any) -> tuple[type, ...] | None:
    if key in _DECLARED_TYPES:
        return _DECLARED_TYPES[key]
    if default is None:
        return None
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, float):
        return (float, int)
    return (type(default),)


def validate(cfg: dict, defaults: dict[str, Any]) -> None:
    """Every check that needs no file, each naming its config key. defaults: the flattened
    default config, which says every key's type."""
    flat = flatten(cfg)
    _check_shape(flat, defaults)
    _check_values(flat, defaults)
    _check_ranges(flat)
    _check_run_name(flat["run.name"])
    _check_data_path(cfg["data"])
    _check_method_and_runtime(cfg)
    _check_teacher_entries(cfg)
    _check_teacher_weights(cfg)


def _check_shape(flat: dict, defaults: dict) -> None:
    """Sections are mappings and leaves single values, as in the defaults."""
    for key in flat:
        if key not in defaults and key != "teachers":
            leaf = next((d for d in defaults if key.startswith(d + ".")), None)
            if leaf is not None:
                raise ConfigError(f"config key '{leaf}' must be a single value, got a mapping")
            raise ConfigError(f"config section '{key}' must be a mapping of keys, "
                              f"got {flat[key]!r}")


def _check_values(flat: dict, defaults: dict) -> None:
    """Each key's type (the default's, or declared), choices and bounds; the lists' lengths."""
    for key, default in defaults.items():
        if key == "teachers":
            continue
        value = flat[key]
        expected = _expected_type(key, default)
        if expected is not None and not (value is None and key in _DECLARED_TYPES):
            if not _type_ok(value, expected):
                names = " or ".join(t.__name__ for t in expected)
                raise ConfigError(f"config key '{key}' must be {names}, got {value!r} "
                                  f"({type(value).__name__}){_spelling_hint(value, expected)}")
        if isinstance(value, float) and not math.isfinite(value):  # inf passes "positive"
            raise ConfigError(f"config key '{key}' must be a finite number, got {value}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"config key '{key}' must be one of {_CHOICES[key]}, got {value!r}")
        if key in _AT_LEAST and value is not None and value < _AT_LEAST[key]:
            raise ConfigError(f"config key '{key}' must be at least {_AT_LEAST[key]}, got {value}")
        if key in _POSITIVE and value is not None and value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    for key, length in (("data.crop_scale", 2), ("data.color_jitter", 3), ("optim.betas", 2)):
        value = flat[key]
        if len(value) != length or not all(_finite_number(v) for v in value):
            raise ConfigError(f"config key '{key}' must be a list of {length} finite numbers, "
                              f"got {value}")


def _check_method_and_runtime(cfg: dict) -> None:
    """The loss terms, and the teacher runtime's settings that go together."""
    bad_terms = [t for t in cfg["method"]["losses"] if t not in choices.LOSS_TERMS]
    if bad_terms or not cfg["method"]["losses"]:
        raise ConfigError(f"method.losses must be a non-empty subset of "
                          f"{list(choices.LOSS_TERMS)}, got {cfg['method']['losses']}")
    runtime = cfg["teacher_runtime"]
    if isinstance(runtime["compile"], str) and runtime["compile"] not in COMPILE_MODES:
        raise ConfigError(f"config key 'teacher_runtime.compile' must be true, false or a "
                          f"torch.compile mode {COMPILE_MODES}, got {runtime['compile']!r}")
    if runtime["fp8"] and (runtime["dtype"] != "bfloat16" or runtime["stack"] == "always"):
        raise ConfigError("teacher_runtime.fp8=true needs teacher_runtime.dtype=bfloat16 and "
                          f"stack auto or never, got dtype={runtime['dtype']}, "
                          f"stack={runtime['stack']}")


def _check_teacher_entries(cfg: dict) -> None:
    """Each teacher's fields; unique names, which method.teachers picks from."""
    for i, t in enumerate(cfg["teachers"]):
        for field, types in (("name", (str,)), ("arch", (str,)), ("weight", (float, int)),
                             ("checkpoint", (str, type(None)))):
            if not _type_ok(t[field], types):
                raise ConfigError(f"teachers[{i}].{field} must be "
                                  f"{' or '.join(x.__name__ for x in types if x is not type(None))}"
                                  f", got {t[field]!r}{_spelling_hint(t[field], types)}")
    names = [t["name"] for t in cfg["teachers"]]
    if len(set(names)) != len(names):
        raise ConfigError(f"teacher names must be unique, got {names}")
    chosen = cfg["method"]["teachers"]
    if chosen is not None:
        unknown = [n for n in chosen if n not in names]
        if unknown or not chosen:
            raise ConfigError(f"method.teachers names {unknown or chosen} not among the "
                              f"configured teachers {names}")


def used_teachers(cfg: dict) -> list[tuple[int, dict]]:
    """(index, entry) of the teachers the run distils from: method.teachers, else all."""
    chosen = cfg["method"]["teachers"]
    return [(i, t) for i, t in enumerate(cfg["teachers"]) if chosen is None or t["name"] in chosen]


def _check_teacher_weights(cfg: dict) -> None:
    """A weight is a non-negative finite number, whatever the fusion (a negative or infinite
    one is never meant); with fusion `weighted`, the only one that reads them, the teachers
    the run uses may not all weigh 0: the fused target would be all zeros."""
    for i, t in enumerate(cfg["teachers"]):
        if not math.isfinite(t["weight"]) or t["weight"] < 0:
            raise ConfigError(f"teachers[{i}].weight must be a finite number >= 0, "
                              f"got {t['weight']!r}")
    used = [t for _, t in used_teachers(cfg)]
    if cfg["method"]["fusion"] == "weighted" and used and not any(t["weight"] for t in used):
        names = ", ".join(f"'{t['name']}'" for t in used)
        raise ConfigError(f"method.fusion=weighted with every teacher the run uses ({names}) "
                          "at weight 0: the fused target would be all zeros; give at least "
                          "one teachers[i].weight > 0")


def _check_run_name(name: str) -> None:
    # The run directory is run.output_dir/run.name: a path here would put it elsewhere.
    if not name or Path(name).name != name or name in (".", ".."):
        raise ConfigError(f"config key 'run.name' must be a plain folder name, got {name!r} "
                          "(the run goes to run.output_dir/run.name: set run.output_dir to "
                          "choose where)")
    try:  # what the filesystem takes, checked before anything is built
        too_long = len(os.fsencode(name)) > 255
    except UnicodeEncodeError:
        raise ConfigError(f"config key 'run.name' cannot be a file name on this system, "
                          f"got {name!r}") from None
    if too_long:
        raise ConfigError(f"config key 'run.name' is longer than a folder name may be (255 "
                          f"bytes), got {len(os.fsencode(name))} bytes: {name[:40]}...")


def _check_ranges(flat: dict) -> None:
    """The list values' own bounds, here so that the message names the config key."""
    low, high = flat["data.crop_scale"]
    if not 0 < low <= high <= 1:
        raise ConfigError(f"config key 'data.crop_scale' must satisfy 0 < low <= high <= 1, "
                          f"got {flat['data.crop_scale']}")
    if min(flat["data.color_jitter"]) < 0:
        raise ConfigError(f"config key 'data.color_jitter' must be 3 non-negative strengths, "
                          f"got {flat['data.color_jitter']}")
    if not all(0 <= b < 1 for b in flat["optim.betas"]):
        raise ConfigError(f"config key 'optim.betas' must be two numbers in [0, 1), "
                          f"got {flat['optim.betas']}")


def _check_data_path(data: dict) -> None:
    """synthetic takes a sample count as its path; every other backend a file or folder."""
    path = data["path"]
    if DATA_PATH[data["backend"]] == "count":
        # a quoted count ("100") reads the same, as it always has
        count = int(path) if isinstance(path, str) and path.isdigit() else path
        if count is not None and (not _type_ok(count, (int,)) or count < 1):
            raise ConfigError(f"config key 'data.path' of backend {data['backend']} is a sample count: "
                              f"a positive integer, or null for ImageNet's 1,281,167; "
                              f"got {path!r}")
    elif path is not None and not isinstance(path, str):
        raise ConfigError(f"config key 'data.path' must be str for backend {data['backend']} "
                          f"(a sample count is for backend synthetic), got {path!r} "
                          f"({type(path).__name__})")


def batch_arithmetic(global_batch: int, micro_batch: int, data_parallel: int) -> int:
    """Gradient accumulation steps; refuses numbers that do not divide."""
    if global_batch <= 0 or micro_batch <= 0:
        raise ConfigError(f"optim.global_batch ({global_batch}) and optim.micro_batch "
                          f"({micro_batch}) must be positive")
    per_step = micro_batch * data_parallel
    if global_batch % per_step:
        raise ConfigError(
            f"optim.global_batch={global_batch} is not a multiple of optim.micro_batch="
            f"{micro_batch} x {data_parallel} data-parallel rank(s) = {per_step}; "
            f"{_batch_hint(global_batch, micro_batch, data_parallel)}")
    return global_batch // per_step


def _batch_hint(global_batch: int, micro_batch: int, data_parallel: int) -> str:
    """The nearest global batches that work, and the largest smaller micro-batch that does."""
    per_step = micro_batch * data_parallel
    below = global_batch // per_step * per_step
    batches = [b for b in (below, below + per_step) if b > 0]
    hint = "choose optim.global_batch=" + " or ".join(map(str, batches))
    per_rank = global_batch // data_parallel if global_batch % data_parallel == 0 else 0
    micro = next((m for m in range(min(micro_batch, per_rank), 0, -1) if per_rank % m == 0), None)
    return hint + (f", or optim.micro_batch={micro}" if micro else
                   f" (the global batch must be a multiple of the {data_parallel} rank(s))")


def student_ranks(cfg: dict, world_size: int) -> int:
    """Data-parallel student ranks: the world less the dedicated teacher ranks."""
    runtime = cfg["teacher_runtime"]
    if runtime["placement"] == "colocated":
        if runtime["teacher_ranks"]:
            raise ConfigError("teacher_runtime.teacher_ranks must be 0 with placement "
                              "'colocated' (set teacher_runtime.placement=dedicated)")
        return world_size
    if runtime["teacher_ranks"] < 1:
        raise ConfigError("placement 'dedicated' needs teacher_runtime.teacher_ranks >= 1")
    from dmt.placement.layout import RankLayout
    try:  # the placement's own rule
        return RankLayout(world_size, runtime["teacher_ranks"]).num_students
    except ConfigError as err:
        raise ConfigError(f"teacher_runtime.{err}") from None


def check_files(cfg: dict) -> None:
    """What a run needs beyond a valid config: teachers, their checkpoint files, and its
    data. (The DeepSpeed file is read and checked by dmt.engine.ds_config.)"""
    if not cfg["teachers"]:
        raise ConfigError("no teachers configured: add at least one entry under 'teachers'")
    _check_teacher_checkpoints(cfg)
    _check_data_files(cfg["data"])


def _check_teacher_checkpoints(cfg: dict) -> None:
    """Every checkpoint the run will load exists; all missing ones are named at once.
    Teachers left out of method.teachers are never loaded (dmt.build), so not checked."""
    missing = []
    for i, t in used_teachers(cfg):
        if not loads_checkpoint(t):
            continue
        if not t["checkpoint"]:
            missing.append(f"teachers[{i}] ('{t['name']}', kind {t['kind']}) has no checkpoint")
        elif not Path(t["checkpoint"]).is_file():
            missing.append(f"teachers[{i}] ('{t['name']}'): checkpoint file not found: "
                           f"{t['checkpoint']}{_why_unreachable(Path(t['checkpoint']))}")
    if missing:
        raise ConfigError("; ".join(missing))


def _why_unreachable(path: Path) -> str:
    """Why a path does not exist, in parentheses after a space, where it is not plain absence
    (then ""): a dangling link (an unmounted file system, say) or a link loop."""
    try:
        os.stat(path)
    except FileNotFoundError:
        if not path.is_symlink():
            return ""
        return f" (a link to {os.readlink(path)}, which does not exist)"
    except OSError as err:
        why = "a loop of symbolic links" if err.errno == errno.ELOOP else err.strerror
        return f" ({why})" if why else ""
    return ""


def _check_data_files(data: dict) -> None:
    path = data["path"]
    if DATA_PATH[data["backend"]] == "count":
        return  # checked by validate
    if path is None and data["sample_images"] <= 0:
        raise ConfigError("data.path is not set (or set data.sample_images to train on the "
                          "bundled sample photos)")
    local = None if path is None else Path(path).expanduser()  # as the loaders read it
    if local is not None and not local.exists():
        raise ConfigError(f"data.path does not exist: {path}{_why_unreachable(local)}")
    if DATA_PATH[data["backend"]] == "file" and local is not None and local.is_dir():
        raise ConfigError(f"data.path {path} is a folder; backend ffcv reads a .beton file: "
                          f"write one with python launch/make_beton.py {path} OUT.beton")


def run_directory(cfg: dict) -> Path:
    """Where a run writes everything: run.output_dir / run.name."""
    return Path(cfg["run"]["output_dir"]) / cfg["run"]["name"]


def resolve_path(path: str | Path, repo_root: Path | None = None) -> Path:
    """Relative paths resolve against the working directory, then the repository root."""
    path = Path(path)
    if path.is_absolute() or path.exists() or repo_root is None:
        return path
    return repo_root / path


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(copy.deepcopy(cfg), sort_keys=False)
