"""Recipe resolution: defaults < scenario < framework config < --config < --set.

Recipes are data. Resolving one reads YAML and the plugins' specs only; nothing is
built and torch is not imported (validation of training arguments imports TRL's
``SFTConfig`` lazily, for its field list). Every leaf key remembers the file it
came from so ``recipes show`` can say why a value is what it is.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# the top-level recipes/ folder, through a link inside the package so that wheels carry it too
REPO_RECIPES = Path(__file__).resolve().parent / "recipes_data"
NO_PLUGIN_RECIPES = ("full-finetuning", "standard-peft")

# Arguments fmsaccel understands beyond SFTConfig / LoraConfig fields (fms-hf-tuning names and our own).
EXTRA_ARGUMENTS = {
    "model_name_or_path": "model folder or built-in shape name",
    "training_data_path": "local JSON/JSONL/datasets folder, builtin:word-tasks, or workload:P|R",
    "torch_dtype": "model dtype (bfloat16, float16, float32)",
    "peft_method": "lora, or null for full fine-tuning",
    "use_flash_attn": "use flash-attn if installed (otherwise sdpa)",
    "response_template": "text after which the loss is counted (response-only loss)",
    "include_tokens_per_second": "kept for fms-hf-tuning compatibility; always measured",
    "evaluation_strategy": "fms-hf-tuning name of eval_strategy",
    "max_seq_length": "fms-hf-tuning name of max_length",
    "benchmark_warmup_steps": "steps excluded from tokens/s and peak memory",
    "progress_steps": "steps between progress lines (default: logging_steps); they never wait for the GPU",
    "shape_overrides": "config overrides for a built-in shape, e.g. {num_hidden_layers: 4}",
    "num_train_examples": "limit the number of training examples (workloads: how many to generate)",
    "attn_implementation": "transformers attention implementation (sdpa, eager, ...)",
    "distributed": "multi-GPU strategy section: {strategy: ddp|fsdp, ...}",
}


class RecipeError(Exception):
    """A user error in a recipe or its inputs: one clear line, exit code 2."""


def recipes_dir() -> Path:
    return Path(os.environ.get("FMSACCEL_RECIPES", REPO_RECIPES))


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``2e-5`` as a float: YAML 1.1 wants a dot, but the seed's files write
    learning rates that way and mean numbers."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(path: Path) -> Any:
    try:
        with open(path) as f:
            return yaml.load(f, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise RecipeError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot be read ({e.strerror if isinstance(e, OSError) else e})") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def closest(word: str, candidates: list[str] | tuple[str, ...] | Any) -> str:
    """'; did you mean X?' or '' — the suggestion users get with every unknown name."""
    match = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    description: str
    plugins: tuple[str, ...]
    framework_file: Path | None
    scenario: str | None


def catalog() -> dict[str, RecipeInfo]:
    """Every recipe name: the CONTENTS.yaml shortnames plus the plugin-free scenarios."""
    root = recipes_dir()
    contents = _load_yaml(root / "CONTENTS.yaml") or {}
    scenarios = _load_yaml(root / "scenarios.yaml") or {}
    owner = {}
    for sc in scenarios.get("scenarios", []):
        for fc in sc.get("framework_config") or []:
            if fc:
                owner.setdefault(fc, sc["name"])
    out = {
        name: RecipeInfo(name, desc, (), None, name)
        for name, desc in (
            ("full-finetuning", "full fine-tuning in bf16, no plugins"),
            ("standard-peft", "bf16 LoRA through TRL/PEFT, no plugins"),
        )
    }
    for entry in contents.get("framework_configs", []):
        name = entry["shortname"]
        plugins = tuple(entry.get("plugins", []))
        out[name] = RecipeInfo(name, entry.get("description", ""), plugins, root / entry["filename"], owner.get(name))
    return out


def recipe_names() -> list[str]:
    return list(catalog())


# ---------------------------------------------------------------------------------------------- merging


@dataclass
class Resolved:
    recipe: str
    args: dict[str, Any]
    plugins: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)  # "args.lr" / "plugins.a.b" -> where it came from
    notes: list[str] = field(default_factory=list)

    def to_yaml_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "arguments": self.args, "plugins": self.plugins}


def _merge_plugins(dst: dict, src: dict, source: str, sources: dict, prefix: str = "plugins") -> None:
    for key, value in src.items():
        dotted = f"{prefix}.{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge_plugins(dst[key], value, source, sources, dotted)
        elif value is None:
            dst.pop(key, None)
            for k in [k for k in sources if k == dotted or k.startswith(dotted + ".")]:
                del sources[k]
        else:
            dst[key] = _copy(value)
            for leaf in _leaves(value, dotted):
                sources[leaf] = source


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return list(value)
    return value


def _leaves(value: Any, prefix: str) -> list[str]:
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{prefix}.{k}")]
    return [prefix]


def _merge_args(dst: dict, src: dict, source: str, sources: dict) -> None:
    """Flat arguments: a value replaces, ``null`` drops the default (the seed's semantics)."""
    for key, value in src.items():
        if value is None:
            dst.pop(key, None)
            sources.pop(f"args.{key}", None)
        else:
            dst[key] = _copy(value)
            sources[f"args.{key}"] = source


def parse_set(item: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (``r=8``, ``target_modules=[q_proj,v_proj]``, ``x=null``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {item!r}: expected key=value")
    if raw.strip().lower() in ("no", "yes", "on", "off", "y", "n"):  # YAML 1.1 booleans; users mean the word
        return key.strip(), raw.strip()
    try:
        value = yaml.load(raw, Loader=YamlLoader) if raw.strip() else ""  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _deep_update(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        dst[k] = _deep_update(dict(dst.get(k) or {}), v) if isinstance(v, dict) else v
    return dst


def _scenario_arguments(info: RecipeInfo, source_file: Path) -> dict[str, Any]:
    if info.scenario is None:
        return {}
    for sc in (_load_yaml(source_file) or {}).get("scenarios", []):
        if sc.get("name") == info.scenario:
            return dict(sc.get("arguments") or {})
    return {}


def resolve(
    name: str,
    config_file: str | Path | None = None,
    sets: list[str] | tuple[str, ...] = (),
    overrides: dict[str, Any] | None = None,
) -> Resolved:
    """Merge a recipe's layers; ``overrides`` are CLI options such as --model (highest priority)."""
    cat = catalog()
    if name not in cat:
        raise RecipeError(f"unknown recipe '{name}'{closest(name, cat)} (see: fmsaccel recipes list)")
    info = cat[name]
    root = recipes_dir()
    args: dict[str, Any] = {}
    plugins: dict[str, Any] = {}
    sources: dict[str, str] = {}
    _merge_args(args, _load_yaml(root / "defaults.yaml") or {}, "recipes/defaults.yaml", sources)
    _merge_args(args, _scenario_arguments(info, root / "scenarios.yaml"),
                f"recipes/scenarios.yaml#{info.scenario}", sources)
    if info.framework_file is not None:
        fw = _load_yaml(info.framework_file) or {}
        _merge_plugins(plugins, fw.get("plugins") or {}, f"recipes/{info.framework_file.relative_to(root)}", sources)
    if config_file is not None:
        _apply_config_file(Path(config_file), args, plugins, sources, recipe=name)
    for item in sets:
        key, value = parse_set(item)
        if key.startswith("plugins."):
            _merge_plugins(plugins, _nest(key[len("plugins."):], value), "--set", sources)
        else:
            key = key.removeprefix("arguments.")
            top, _, rest = key.partition(".")
            if rest:  # a nested argument such as distributed.strategy=fsdp
                if not isinstance(args.get(top) or {}, dict):
                    raise RecipeError(f"--set {item}: argument {top} is {args[top]!r}, not a mapping")
                value = _deep_update(dict(args.get(top) or {}), _nest(rest, value))
            _merge_args(args, {top: value}, "--set", sources)
    for key, value in (overrides or {}).items():
        if value is not None:
            _merge_args(args, {key: value}, f"--{key}", sources)
    args, plugins = _interpolate(args, plugins, sources)
    resolved = Resolved(name, args, plugins, sources)
    model = args.get("model_name_or_path")
    if isinstance(model, list):
        args["model_name_or_path"] = model[0]
        resolved.notes.append(f"model_name_or_path is a list; run takes the first ({model[0]}); bench expands it")
    return resolved


def _interpolate(args: dict, plugins: dict, sources: dict[str, str]) -> tuple[dict, dict]:
    """Resolve omegaconf ``${...}`` interpolations over the merged recipe (``output_dir: outputs/r${r}``).

    Arguments are at the root and the framework config under ``plugins``, as ``recipes show`` prints them.
    omegaconf is imported only when a value asks for it (the CLI stays light).
    """
    tree = {**args, "plugins": plugins}
    if "${" not in repr(tree):
        return args, plugins
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        resolved = OmegaConf.to_container(OmegaConf.create(tree), resolve=True)
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or "")
        where = sources.get(key) or sources.get(f"args.{key}") or "the recipe"
        raise RecipeError(f"{where}: {key or 'a value'}: cannot resolve interpolation ({getattr(e, 'msg', e)})") \
            from None
    resolved_plugins = resolved.pop("plugins")
    return resolved, resolved_plugins


def config_file_recipe(path: str | Path) -> str | None:
    """The ``recipe:`` a recipe file (from ``recipes cp``) names, if any."""
    data = _load_yaml(Path(path))
    return data.get("recipe") if isinstance(data, dict) else None


def _apply_config_file(path: Path, args: dict, plugins: dict, sources: dict, recipe: str | None = None) -> None:
    data = _load_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping with 'plugins:' and/or 'arguments:'")
    if recipe is not None and data.get("recipe") not in (None, recipe):
        raise RecipeError(f"{path} is a copy of recipe '{data['recipe']}', not '{recipe}': "
                          f"run it with --recipe {data['recipe']} (or drop --recipe)")
    unknown = set(data) - {"plugins", "arguments", "recipe"}
    if unknown:
        key = sorted(unknown)[0]
        raise RecipeError(
            f"{path}: unknown top-level key '{key}'{closest(key, ['plugins', 'arguments', 'recipe'])} "
            "(a recipe file has 'arguments:' and 'plugins:'; a framework config has 'plugins:')"
        )
    _merge_args(args, data.get("arguments") or {}, str(path), sources)
    _merge_plugins(plugins, data.get("plugins") or {}, str(path), sources)


# ---------------------------------------------------------------------------------------------- validation


def active_plugins(plugins: dict[str, Any], sources: dict[str, str] | None = None):
    """Validate the ``plugins:`` tree against the specs; return [(spec, {path: keys with defaults})]."""
    from fmsaccel_framework.registry import discover, path_owners
    from fmsaccel_framework.spec import MISSING

    owners = path_owners()
    sources = sources or {}
    found: dict[str, dict[str, dict[str, Any]]] = {}

    def where(dotted: str) -> str:
        return sources.get(dotted) or next((v for k, v in sources.items() if k.startswith(dotted)), "config")

    def walk(node: Any, path: str) -> None:
        if path in owners:
            if node is None:
                node = {}
            if not isinstance(node, dict):
                raise RecipeError(f"{where('plugins.' + path)}: plugins.{path} must be a mapping of keys")
            spec = owners[path]
            keys = spec.paths[path]
            values: dict[str, Any] = {}
            for k, v in node.items():
                if k not in keys:
                    raise RecipeError(
                        f"{where(f'plugins.{path}.{k}')}: unknown key plugins.{path}.{k}{closest(k, keys)} "
                        f"(plugin {spec.name} accepts: {', '.join(keys)})"
                    )
                _check_value(keys[k], v, f"plugins.{path}.{k}", where(f"plugins.{path}.{k}"))
                values[k] = v
            for k, key in keys.items():
                if k not in values:
                    if key.default is MISSING:
                        raise RecipeError(f"{where('plugins.' + path)}: plugins.{path}.{k} is required")
                    values[k] = key.default
            found.setdefault(spec.name, {})[path] = values
            return
        leads_somewhere = not path or any(o.startswith(path + ".") for o in owners)
        if not leads_somewhere or not isinstance(node, dict) or not node:
            prefixes = sorted(owners)
            raise RecipeError(
                f"{where('plugins.' + path)}: no plugin claims plugins.{path}{closest(path, prefixes)} "
                f"(known paths: {', '.join(prefixes)})"
            )
        for k, v in node.items():
            walk(v, f"{path}.{k}" if path else k)

    if plugins:
        for k, v in plugins.items():
            walk(v, k)
    specs = discover()
    return [(specs[name], cfg) for name, cfg in found.items()]


def _check_value(key, value: Any, dotted: str, source: str) -> None:
    types = key.type if isinstance(key.type, tuple) else (key.type,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types and int in types)
    if int in types and isinstance(value, bool) and bool not in types:
        ok = False
    if not ok:
        names = "/".join("null" if t is type(None) else t.__name__ for t in types)
        raise RecipeError(f"{source}: {dotted} = {value!r} has the wrong type (expected {names})")
    if key.choices is not None and value not in key.choices:
        choices = ", ".join("null" if c is None else str(c).lower() if isinstance(c, bool) else str(c)
                            for c in key.choices)
        raise RecipeError(f"{source}: {dotted} = {value!r} is not one of: {choices}{closest(value, key.choices)}")


def check_combination(active, sources: dict[str, str] | None = None) -> None:
    """Refuse plugin combinations that cannot work, before anything is built."""
    sources = sources or {}

    def origin(path: str) -> str:
        return next((v for k, v in sources.items() if k.startswith(f"plugins.{path}")), "config")

    loaders = [(spec.name, path) for spec, c in active if spec.loads_model for path in c]
    if len(loaders) > 1:
        where = ", ".join(f"plugins.{path} from {origin(path)}" for _, path in loaders)
        raise RecipeError(f"plugins {' and '.join(n for n, _ in loaders)} both load the model; "
                          f"a recipe can use only one ({where})")
    cfg = {path: keys for _, c in active for path, keys in c.items()}
    foak = cfg.get("peft.quantization.fused_ops_and_kernels") or cfg.get("training.fused_ops_and_kernels")
    if foak is not None:
        if "peft.quantization.fused_ops_and_kernels" in cfg and "training.fused_ops_and_kernels" in cfg:
            raise RecipeError("fused_ops_and_kernels is configured twice (under peft.quantization and training)")
        base = foak.get("base_layer")
        need = {"bitsandbytes": "peft.quantization.bitsandbytes", "auto_gptq": "peft.quantization.auto_gptq"}
        if base in need and need[base] not in cfg:
            raise RecipeError(
                f"fused_ops_and_kernels.base_layer is {base} but plugins.{need[base]} is not configured"
            )
        for quant, path in need.items():
            if path in cfg and base != quant and foak.get("fused_lora"):
                raise RecipeError(
                    f"fused_lora over a {quant} model needs fused_ops_and_kernels.base_layer: {quant} (got {base})"
                )
    if "training.dataloader.multipack" in cfg and "training.attention.padding_free" not in cfg:
        raise RecipeError("training.dataloader.multipack needs training.attention.padding_free as well")


def validate_arguments(args: dict[str, Any], sources: dict[str, str]) -> None:
    """Check every argument against SFTConfig / LoraConfig fields and our extras (names and basic types)."""
    fields = training_argument_types()
    for key, value in args.items():
        source = sources.get(f"args.{key}", "arguments")
        if key not in fields:
            raise RecipeError(f"{source}: unknown argument '{key}'{closest(key, fields)}")
        expected = fields[key]
        if expected is not None and value is not None and not _type_ok(value, expected):
            raise RecipeError(
                f"{source}: argument {key} = {value!r} has the wrong type (expected {_type_name(expected)})"
            )


_SIMPLE = (bool, int, float, str, list, dict)


def _type_ok(value: Any, expected: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in expected or str in expected
    if isinstance(value, int):
        return bool(set(expected) & {int, float, str})
    if isinstance(value, float):
        return float in expected or str in expected
    if isinstance(value, str):
        return bool(set(expected) & {str}) or not set(expected) & {int, float, bool}
    return isinstance(value, expected)


def _type_name(expected: tuple[type, ...]) -> str:
    return "/".join(t.__name__ for t in expected)


def training_argument_types() -> dict[str, tuple[type, ...] | None]:
    """Field name -> simple types accepted (None: anything), from the real SFTConfig and LoraConfig.

    Importing TRL and PEFT takes most of ``fmsaccel run``'s own seconds (every benchmark cell pays them), and the
    answer only changes with their versions: it is cached on disk per (trl, peft, transformers) version.
    """
    import json
    from importlib import metadata

    from .files import atomic_write
    from .models import cache_root

    try:
        versions = "-".join(metadata.version(name) for name in ("trl", "peft", "transformers"))
    except metadata.PackageNotFoundError:
        versions = None
    cached = cache_root() / "argument-types" / f"{versions}.json"
    try:
        out = {k: None if v is None else tuple(_SIMPLE_BY_NAME[t] for t in v)
               for k, v in json.loads(cached.read_text()).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        out = _introspect_argument_types()
        if versions and all(v is None or all(t.__name__ in _SIMPLE_BY_NAME for t in v) for v in out.values()):
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(cached, json.dumps({k: None if v is None else [t.__name__ for t in v]
                                                 for k, v in out.items()}))
            except OSError:
                pass  # a read-only cache only costs the import next time
    out.update({k: None for k in EXTRA_ARGUMENTS})
    out["target_modules"] = (list, str)
    return out


_SIMPLE_BY_NAME = {t.__name__: t for t in _SIMPLE}


def _introspect_argument_types() -> dict[str, tuple[type, ...] | None]:
    import dataclasses
    import typing

    from peft import LoraConfig
    from trl import SFTConfig

    def simple(tp: Any) -> tuple[type, ...] | None:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            parts = [simple(a) for a in typing.get_args(tp) if a is not type(None)]
            if any(p is None for p in parts):
                return None
            return tuple(dict.fromkeys(t for p in parts for t in p)) or None
        if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
            return (list,)
        if origin is dict or tp is dict:
            return (dict,)
        if origin is typing.Literal:
            return tuple({type(a) for a in typing.get_args(tp)})
        if isinstance(tp, type) and issubclass(tp, __import__("enum").Enum):
            return (str,)  # given by name (also the str-based enums, which the next test would keep as themselves)
        if isinstance(tp, type) and issubclass(tp, _SIMPLE):
            return (float, int) if tp is float else (tp,)
        return None

    out: dict[str, tuple[type, ...] | None] = {}
    for cls in (LoraConfig, SFTConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f.name] = simple(hints.get(f.name, Any))
    return out


def validate(resolved: Resolved, check_args: bool = True):
    """Validate a resolved recipe without building anything; returns the active plugins."""
    active = active_plugins(resolved.plugins, resolved.sources)
    check_combination(active, resolved.sources)
    if check_args:
        validate_arguments(resolved.args, resolved.sources)
    return active


def load_recipe_file(path: str | Path) -> Resolved:
    """A user's recipe file (from ``recipes cp``) or bare framework config, merged over its base recipe."""
    path = Path(path)
    data = _load_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping")
    base = data.get("recipe") or ("standard-peft" if "plugins" not in data else None)
    if base is None:
        # a bare framework config: validate its plugins over no recipe defaults
        resolved = Resolved("(file)", {}, {}, {})
        _apply_config_file(path, resolved.args, resolved.plugins, resolved.sources)
        return resolved
    return resolve(base, config_file=path)


def validate_scenarios(path: str | Path) -> int:
    """Check a scenarios file (the seed's schema): names, shortnames, argument names and types."""
    path = Path(path)
    data = _load_yaml(path) or {}
    scenarios = data.get("scenarios")
    if not isinstance(scenarios, list):
        raise RecipeError(f"{path}: expected a 'scenarios:' list")
    known = catalog()
    for i, sc in enumerate(scenarios):
        if not isinstance(sc, dict) or "name" not in sc:
            raise RecipeError(f"{path}: scenario #{i + 1} has no name")
        unknown = set(sc) - {"name", "framework_config", "slow", "arguments"}
        if unknown:
            key = sorted(unknown)[0]
            raise RecipeError(f"{path}: scenario {sc['name']}: unknown key '{key}'"
                              f"{closest(key, ['name', 'framework_config', 'slow', 'arguments'])}")
        for fc in sc.get("framework_config") or []:
            if fc and fc not in known:
                raise RecipeError(f"{path}: scenario {sc['name']}: unknown framework_config '{fc}'{closest(fc, known)}")
        args = dict(sc.get("arguments") or {})
        if isinstance(args.get("model_name_or_path"), list):
            args["model_name_or_path"] = args["model_name_or_path"][0]
        validate_arguments({k: v for k, v in args.items() if v is not None},
                           {f"args.{k}": f"{path} (scenario {sc['name']})" for k in args})
    return len(scenarios)
