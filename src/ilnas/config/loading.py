"""Where settings come from: the defaults of the schema <- a preset (after the base presets it names)
<- a --config file <- --set overrides, merged section by section, coerced to the schema's types and
validated. Safe YAML only (no aliases), size-limited files, one-line errors."""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ilnas.data.names import side_setting
from ilnas.config.schema import (KIND_COMMANDS, KIND_NAMES, KINDS, DataConfig, RunConfig, flat_settings,
                                 unused_settings, validate)
from ilnas.errors import IlnasError
from ilnas.fileio import shortened

MAX_CONFIG_BYTES = 1 << 20
# The largest number a float setting may hold: the step hands settings (and their products) to float32
# kernels, which raise an overflow traceback past ~3.4e38; no learning rate or decay comes near this.
MAX_FLOAT = 1e30

# Settings that have moved to their own section: a config file written for the flat layout gets a pointer.
MOVED = {**{f"search.{k}": f"engine.{k}" for k in ("order", "hvp", "fd_eps", "coupling", "lam", "allow_unstable",
                                                     "update_order", "virtual_momentum", "train_weights", "val_weights")},
         **{f"{s}.{k}": f"optimizer.{k}" for s in ("search", "train") for k in (
             "lr", "lr_min", "momentum", "weight_decay", "grad_clip", "schedule", "step_size", "gamma")},
         "train.warmup_epochs": "optimizer.warmup_epochs",
         **{f"search.arch_{k}": f"arch_optimizer.{k}" for k in ("lr", "betas", "weight_decay")}}


# --- presets ----------------------------------------------------------------------------------

def _preset_dir():
    return resources.files("ilnas").joinpath("presets")


def list_presets() -> dict[str, str]:
    """name -> description, for every preset that ships with ilnas (base presets, named ``_*``, aside)."""
    out = {}
    for f in sorted(_preset_dir().iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml") and not f.name.startswith("_"):
            out[f.name[:-5]] = (yaml.safe_load(f.read_text()) or {}).get("description", "")
    return out


SMALL_IMAGES_PRESET_TASK = "mnist5k"  # its preset re-trains a task held in memory at data.image_size without one


def retraining_presets(tasks: Sequence[str], image_size: int | None = None,
                       folder_pipeline: str = "memory") -> list[tuple[str, list[str]]]:
    """(task, the arguments that re-train on it) for each of ``tasks`` a shipped eval preset covers: the preset of that
    task alone; an image folder's (of the search's pipeline) with ``--set data.tasks=[task]``; for any other task held
    in memory at data.image_size (digits, one of one's own) the small-image recipe on it. Where data.image_size sizes
    the task's images and the search's ``image_size`` is not the preset's, it is set too: the re-training sees the
    images the search saw. What a finished search suggests next."""
    alone: dict[str, tuple[str, DataConfig]] = {}  # a task's kind (imagefolder for any folder) -> preset, its data
    for name in (n for n in list_presets() if n.startswith("eval-")):
        data = resolve(name, kind="eval").data
        kind = data.tasks[0].partition(":")[0]
        if len(data.tasks) == 1 and (kind != "imagefolder" or data.folder_pipeline == folder_pipeline):
            alone.setdefault(kind, (name, data))
    found = []
    for task in tasks:
        sized = side_setting(task, folder_pipeline) == "data.image_size"
        preset, data = alone.get(task.partition(":")[0]) or (alone[SMALL_IMAGES_PRESET_TASK] if sized else (None, None))
        if preset is None:
            continue
        args = ["--preset", preset, *(["--set", f"data.tasks=[{task}]"] if data.tasks != (task,) else [])]
        if sized and image_size is not None and image_size != data.image_size:
            args += ["--set", f"data.image_size={image_size}"]
        found.append((task, args))
    return found


def load_preset(name: str) -> dict:
    """A preset's own mapping (its ``base``, if any, not yet applied)."""
    f = _preset_dir().joinpath(f"{name}.yaml")
    if not isinstance(name, str) or not re.fullmatch(r"_?[a-z0-9][a-z0-9-]{0,99}", name) or not f.is_file():
        raise IlnasError(f"unknown preset {shortened(repr(name))}; known: {', '.join(list_presets())}")
    return load_yaml(f.read_text()) or {}


def _with_bases(layer: dict, where: str, seen: tuple[str, ...] = ()) -> list[tuple[dict, str]]:
    """A preset or config file preceded by the chain of base presets it names (``base: NAME``)."""
    own = {k: v for k, v in layer.items() if k != "base"}
    if "base" not in layer:
        return [(own, where)]
    base = layer["base"]
    if not isinstance(base, str) or base in seen:
        raise IlnasError(f"{where}: base {base!r} is not a preset name or repeats one ({' -> '.join(seen)})")
    return _with_bases(load_preset(base), f"preset {base}", (*seen, base)) + [(own, where)]


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without aliases (a few lines of nested aliases expand to billions of entries) and without a key
    given twice in one mapping (YAML would keep the last one's value: a section written twice in a config file
    loses the first one's settings, silently)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not accepted",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        mapping = super().construct_mapping(node, deep=deep)
        if len(mapping) < len(node.value):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
        return mapping


def load_yaml(text: str) -> Any:
    """Parse configuration YAML: safe types only, no aliases; nesting too deep for the parser is a YAMLError."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


def load_yaml_file(path: str | Path, what: str = "config file", holds: str = "a mapping of sections") -> dict:
    """A YAML file that must hold a mapping (a --config file, a sweep spec), every way it can fail one line
    that names it as ``what``; an empty file is an empty mapping."""
    p = Path(path)
    try:
        if not p.is_file():
            raise IlnasError(f"{what} {path} does not exist or is not a file")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise IlnasError(f"{what} {path} is larger than {MAX_CONFIG_BYTES} bytes")
        data = load_yaml(p.read_bytes().decode("utf-8"))
    except OSError as e:
        raise IlnasError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise IlnasError(f"{what} {path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise IlnasError(f"{what} {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise IlnasError(f"{what} {path} must hold {holds}")
    return data


# --- merging ------------------------------------------------------------------------------------------

def _sections() -> set[str]:
    """The names of the configuration's sections (data, search, train, ...)."""
    return {f.name for cls in KINDS.values() for f in dataclasses.fields(cls) if f.name not in ("kind", "description")}


def _merge(into: dict, layer: dict, where: str) -> None:
    """Sections merge key by key; a section given as anything but a mapping is an error, not a reset."""
    for section, values in layer.items():
        if section not in _sections():
            into[section] = values  # "kind", "description", or an unknown key that from_dict reports
            continue
        if values is None:  # an empty section ("search:" with nothing below)
            values = {}
        if not isinstance(values, dict):
            raise IlnasError(f"{where}: section {section!r} must be a mapping of settings, got {values!r}"[:200])
        into[section] = {**into.get(section, {}), **values}


def parse_override(text: str) -> tuple[list[str], Any]:
    """'engine.lam=10' -> (['search', 'lam'], 10). The value is read as YAML (numbers, lists, null)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise IlnasError(f"malformed --set {text!r}: expected section.key=value, e.g. engine.lam=10")
    try:
        parsed = load_yaml(value) if value.strip() else ""
    except yaml.YAMLError:
        raise IlnasError(f"malformed --set {text!r}: the value is not valid YAML") from None
    return key.strip().split("."), parsed


def _nest(keys: list[str], value: Any) -> dict:
    """["engine", "lam"], 10 -> {"engine": {"lam": 10}}."""
    for key in reversed(keys[1:]):
        value = {key: value}
    return {keys[0]: value}


def unread_overrides(config: dict, overrides: Sequence[str]) -> list[tuple[str, str]]:
    """(setting, reason) of each ``--set`` of ``overrides`` that ``config`` (as config.yaml holds it) never reads:
    a value set for nothing (space.layers of a P-DARTS search, say) that its user believes changed the run."""
    unused = unused_settings(config)
    named = [k for o in overrides for k in flat_settings(_nest(*parse_override(o)))]
    return [(k, unused[k]) for k in dict.fromkeys(named) if k in unused]


def _set_nested(d: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise IlnasError(f"cannot set {'.'.join(keys)}: {k} is not a section")
    d[keys[-1]] = value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except IlnasError as e:
                errors.append(str(e))
        raise IlnasError(errors[0] if errors else f"{where} may not be null")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise IlnasError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise IlnasError(f"{where} must have {len(args)} entries, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise IlnasError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise IlnasError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", value):
            value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise IlnasError(f"{where} must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not abs(value) <= MAX_FLOAT:
            raise IlnasError(f"{where} must be a finite number of at most {MAX_FLOAT:g} in size, got {value}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise IlnasError(f"{where} must be a mapping, got {value!r}"[:200])
        return dict(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise IlnasError(f"{where} must be a string, got {value!r}")
        return str(value)
    raise IlnasError(f"{where}: unsupported type {tp}")


def from_dict(cls: type, data: dict, where: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from ``data`` over its defaults, or over ``base`` (an instance of it); unknown keys
    are errors. A section keeps what its parent's default for it holds where ``data`` is silent (the search's
    SGD decays to lr_min 0.001, the class's to 0): one key set in a section must not reset the others."""
    if not isinstance(data, dict):
        raise IlnasError(f"{where[:-1] or 'config'} must be a mapping, got {data!r}"[:200])  # where: "search."
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown and where + unknown[0] in MOVED:
        raise IlnasError(f"config key {where + unknown[0]!r} is now {MOVED[where + unknown[0]]!r}")
    if unknown:
        raise IlnasError(f"unknown config key {where + unknown[0]!r}; valid keys{' in ' + where[:-1] if where else ''}: "
                         f"{', '.join(names)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [name for name, f in fields.items() if name not in data and base is None and
               f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:  # a record without defaults (a model card) cut short: was a TypeError's traceback
        raise IlnasError(f"missing key{'s' * (len(missing) > 1)} {', '.join(where + m for m in missing)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{where}{name}.", _default(fields[name]))
        else:
            kwargs[name] = _coerce(value, tp, f"{where}{name}")
    return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def to_dict(cfg: Any) -> dict:
    """A plain, YAML-friendly dict (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def checked(cfg: Any, kind: str) -> RunConfig:
    """A configuration handed to a recipe in Python, held to what ``resolve`` holds one to: of the recipe's kind,
    every value of its type (``dataclasses.replace`` of a resolved configuration passes anything), validated."""
    expected = KINDS[kind]
    if not isinstance(cfg, expected):
        raise IlnasError(f"expected a {KIND_NAMES[kind]} configuration ({expected.__name__}: ilnas.resolve(preset, "
                         f"kind={kind!r})), got {type(cfg).__name__}")
    cfg = from_dict(expected, to_dict(cfg))
    validate(cfg)
    return cfg


def checked_section(value: Any, cls: type, section: str) -> Any:
    """A section of a configuration handed over in Python (``SupernetSearch``'s engine, sgd, arch_optimizer and
    space), held to the types ``resolve`` holds it to: an instance of ``cls``, every value of its field's type."""
    if not isinstance(value, cls):
        raise IlnasError(f"{section} must be an ilnas.{cls.__name__}, got {type(value).__name__}")
    return from_dict(cls, to_dict(value), f"{section}.")


def resolve(preset: str | None = None, config_file: str | None = None,
            overrides: Sequence[str] | Mapping[str, Any] = (), kind: str | None = "search") -> RunConfig:
    """Defaults <- preset (after the base presets it names) <- config file (after its bases) <- overrides,
    then validation. ``overrides``: ``--set`` strings (``"engine.lam=10"``) or a mapping of dotted keys or
    sections to values (``{"engine.lam": 10, "search": {"epochs": 3}}``). ``kind=None`` takes whichever kind
    the preset or file declares (default search)."""
    if kind is not None and kind not in KINDS:
        raise IlnasError(f"kind must be one of {', '.join(KINDS)} or None, got {kind!r}")
    for name, value in (("preset", preset), ("config_file", config_file)):
        if value is not None and not isinstance(value, (str, Path)):
            raise IlnasError(f"{name} must be a {'name' if name == 'preset' else 'path'}, got {type(value).__name__}")
    if isinstance(overrides, (str, bytes)) or not hasattr(overrides, "__iter__"):  # a string: one per letter
        raise IlnasError(f"overrides must be a list of 'section.key=value' strings or a mapping, got "
                         f"{shortened(repr(overrides), 80)}")
    layers: list[tuple[dict, str]] = []
    if preset is not None:
        if not preset.strip():
            raise IlnasError("--preset is empty; name a preset (see `ilnas presets`)")
        if preset.startswith("_"):
            raise IlnasError(f"{preset} is a base preset: name it as `base: {preset}` in a preset or config file")
        layers += _with_bases(load_preset(preset), f"preset {preset}", (preset,))
    if config_file is not None:
        data = load_yaml_file(config_file)
        if "base" in data and preset is not None:
            raise IlnasError(f"config file {config_file} names a base preset; drop --preset")
        layers += _with_bases(data, f"config file {config_file}")
    user: dict = {}
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            _merge(user, _nest(str(key).split("."), value), "overrides")
    else:
        for text in overrides:
            keys, value = parse_override(text)
            _set_nested(user, keys, value)
    merged: dict = {}
    for layer, where in [*layers, (user, "--set")]:
        _merge(merged, layer, where)
    from_preset = preset is not None or len(layers) > 1
    found_kind = merged.get("kind", "search" if from_preset or kind is None else kind)  # presets say "kind: eval"
    if not isinstance(found_kind, str) or found_kind not in KINDS:  # a list or mapping is no key of KINDS
        raise IlnasError(f"kind must be one of {', '.join(KINDS)}, got {found_kind!r}")
    if kind is not None and found_kind != kind:
        source = " with ".join(x for x in (preset and f"preset {preset}", config_file and f"config file {config_file}")
                               if x) or "the configuration given"
        raise IlnasError(f"{source} is a {KIND_NAMES[found_kind]} configuration (kind: {found_kind}), not a "
                         f"{KIND_NAMES[kind]} one: `{KIND_COMMANDS[found_kind]}` runs it (in Python: resolve(..., "
                         f"kind={found_kind!r}))")
    cfg = from_dict(KINDS[found_kind], merged)
    validate(cfg)
    return cfg
