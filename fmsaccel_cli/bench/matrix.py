"""Expand a scenarios file (the fms-acceleration ``scenarios.yaml`` schema) into benchmark cells.

One cell = scenario x framework_config entry x model x data path x effective batch size x GPU count, run as its
own ``fmsaccel run``. Semantics follow the seed so an existing scenarios file works unchanged:

- ``framework_config`` entries are recipe shortnames; an empty entry (or no key) means no plugin, and the cell runs
  the scenario's own recipe (``full-finetuning`` / ``standard-peft``, or one of those by ``peft_method``).
- ``arguments`` are single values, except ``model_name_or_path`` (and our ``training_data_path``), which may be
  lists and become matrix axes. ``target_modules`` given as one space-separated string is split into a list.
- Arguments merge as defaults file < scenario < command-line ``--set``; ``null`` drops a default: it is passed on as
  ``key=null`` so ``fmsaccel run`` drops its own default too.
- The per-device batch is the effective batch / (GPUs x gradient accumulation), unless the scenario fixes
  ``per_device_train_batch_size``; then a ``null`` gradient accumulation is computed to reach the effective batch
  (the seed's MoE scenarios), and a fixed one makes the effective-batch axis moot (cells are not repeated).
- ``slow: true`` scenarios run only when named (``--run-only-scenarios``, or one of their recipes in ``--recipes``).

Where the seed silently dropped an unknown framework_config shortname, we stop with an error naming it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..recipes import YamlLoader

MATRIX_AXES = ("model_name_or_path", "training_data_path")
NO_PLUGIN = "none"  # the seed's framework_config value for a cell without plugins
BASELINE = "baseline-peft-bnb"


class BenchError(Exception):
    """A user error in a scenarios/defaults file or the bench options: printed as one line, exit code 2."""


@dataclass(frozen=True)
class Scenario:
    name: str
    framework_configs: tuple[str, ...]  # "" = no plugin
    arguments: dict[str, Any]
    slow: bool = False


@dataclass
class Cell:
    """One benchmark run. ``arguments`` is everything passed to ``fmsaccel run`` with ``--set``."""

    scenario: str
    framework_config: str  # a recipe shortname, or "" for no plugin
    recipe: str
    model_name_or_path: str
    num_gpus: int
    effective_batch_size: int
    per_device_train_batch_size: int
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def training_data_path(self) -> str:
        return str(self.arguments.get("training_data_path") or "")

    @property
    def cell_id(self) -> str:
        """Stable identity for --resume: the matrix coordinates plus a hash of every argument."""
        parts = [self.scenario, self.framework_config or NO_PLUGIN, self.model_name_or_path]
        if self.training_data_path:
            parts.append(self.training_data_path)
        parts += [f"gpus{self.num_gpus}", f"ebs{self.effective_batch_size}"]
        return "/".join(parts) + "#" + self.arguments_hash

    @property
    def arguments_hash(self) -> str:
        blob = json.dumps(self.arguments, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:8]

    @property
    def dir_name(self) -> str:
        """A filesystem-safe folder name derived from the cell id (a model path may contain '/')."""
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", self.cell_id.split("#")[0].replace("/", "__"))
        return f"{readable[:150]}-{self.arguments_hash}"

    def set_items(self) -> list[str]:
        """``key=value`` strings for ``--set``; values are written so that YAML reads them back unchanged."""
        return [f"{key}={yaml_value(value)}" for key, value in self.arguments.items()]

    def command(self, run_prefix: list[str], output_dir: Path | str) -> list[str]:
        cmd = [*run_prefix, "--recipe", self.recipe, "--yes", "--output-dir", str(output_dir)]
        cmd += ["--nproc-per-node", str(self.num_gpus)]
        for item in self.set_items():
            cmd += ["--set", item]
        return cmd


def yaml_value(value: Any) -> str:
    """One value as YAML flow text that ``yaml.safe_load`` turns back into the same value.

    PyYAML follows YAML 1.1, which reads ``1e-05`` as a string, so floats always carry a dot in the mantissa.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if text in ("inf", "-inf", "nan"):
            return {"inf": ".inf", "-inf": "-.inf", "nan": ".nan"}[text]
        mantissa, e, exponent = text.partition("e")
        if "." not in mantissa:
            mantissa += ".0"
        if e and exponent[0] not in "+-":
            exponent = "+" + exponent
        return mantissa + (e + exponent if e else "")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        special = re.search(r"[#,\[\]{}&*!|>'\"%@`\n]|:\s|:$", value)
        plain = bool(value) and value.strip() == value and not special
        try:
            plain = plain and yaml.safe_load(value) == value
        except yaml.YAMLError:
            plain = False
        return value if plain else json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{yaml_value(str(k))}: {yaml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


# ---------------------------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> Any:
    try:
        with open(path) as f:
            return yaml.load(f, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass (2e-5 is a float)
    except FileNotFoundError:
        raise BenchError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise BenchError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_scenarios(path: str | Path) -> list[Scenario]:
    """Read and check a scenarios file; unknown framework_config shortnames are an error, not a silent skip."""
    from fmsaccel_cli.recipes import catalog, closest

    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("scenarios"), list):
        raise BenchError(f"{path}: expected a top-level 'scenarios:' list")
    known = catalog()
    scenarios: list[Scenario] = []
    for i, raw in enumerate(data["scenarios"]):
        if not isinstance(raw, dict) or not raw.get("name"):
            raise BenchError(f"{path}: scenario #{i + 1} needs a 'name'")
        name = str(raw["name"])
        if name in {s.name for s in scenarios}:
            raise BenchError(f"{path}: scenario '{name}' appears twice")
        arguments = raw.get("arguments")
        if not isinstance(arguments, dict):
            raise BenchError(f"{path}: scenario '{name}' needs an 'arguments:' mapping")
        entries = raw.get("framework_config")
        entries = [None] if entries is None else entries if isinstance(entries, list) else [entries]
        configs = []
        for entry in entries:
            shortname = "" if entry is None else str(entry).strip()
            if shortname and shortname not in known:
                raise BenchError(
                    f"{path}: scenario '{name}': unknown framework_config '{shortname}'{closest(shortname, known)} "
                    "(see: fmsaccel recipes list)"
                )
            configs.append(shortname)
        scenarios.append(Scenario(name, tuple(configs), dict(arguments), bool(raw.get("slow", False))))
    return scenarios


def load_defaults(path: str | Path | None) -> dict[str, Any]:
    """The seed's flat defaults file (training arguments by name); no file means no defaults."""
    if path is None:
        return {}
    data = _read_yaml(Path(path)) or {}
    if not isinstance(data, dict):
        raise BenchError(f"{path}: expected a mapping of argument: value")
    return data


# ---------------------------------------------------------------------------------------------- expansion


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _recipe_for(scenario: Scenario, shortname: str, arguments: dict[str, Any]) -> str:
    if shortname:
        return shortname
    if scenario.name in ("full-finetuning", "standard-peft"):
        return scenario.name
    return "standard-peft" if arguments.get("peft_method") == "lora" else "full-finetuning"


class _Impossible(Exception):
    """A batch size / GPU count combination a scenario cannot run."""


def _batch_sizes(scenario: Scenario, arguments: dict, effective: int, gpus: int) -> tuple[int, int, int | None]:
    """(effective batch, per-device batch, gradient accumulation to set or None to leave as is)."""
    accumulation = arguments.get("gradient_accumulation_steps")
    if "per_device_train_batch_size" in scenario.arguments:
        per_device = int(scenario.arguments["per_device_train_batch_size"])
        if accumulation is not None:
            return per_device * gpus * int(accumulation), per_device, None
        if effective % (per_device * gpus):
            raise _Impossible(
                f"scenario '{scenario.name}': effective batch {effective} is not a multiple of its "
                f"per_device_train_batch_size {per_device} x {gpus} GPU(s)"
            )
        return effective, per_device, effective // (per_device * gpus)
    steps = int(accumulation or 1)
    if effective % (gpus * steps):
        raise _Impossible(
            f"scenario '{scenario.name}': effective batch {effective} does not split over {gpus} GPU(s)"
            + (f" x {steps} accumulation steps" if steps > 1 else "")
        )
    return effective, effective // (gpus * steps), None


def expand(
    scenarios: list[Scenario],
    defaults: dict[str, Any] | None = None,
    effective_batch_sizes: list[int] | tuple[int, ...] = (4, 8),
    num_gpus: list[int] | tuple[int, ...] = (1,),
    run_only_scenarios: list[str] | None = None,
    recipes: list[str] | None = None,
    models: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[list[Cell], list[str]]:
    """(every cell of the matrix in file order, one line per batch/GPU combination a scenario cannot run).

    An impossible combination (an effective batch that does not split over the GPUs) is left out and reported
    rather than failing the whole matrix, since one batch list is shared by scenarios with different constraints.
    """
    from fmsaccel_cli.recipes import closest

    names = [s.name for s in scenarios]
    for name in run_only_scenarios or []:
        if name not in names:
            raise BenchError(f"--run-only-scenarios: no scenario '{name}'{closest(name, names)} in the matrix file")
    if recipes:
        offered = {_recipe_for(s, fc, s.arguments) for s in scenarios for fc in s.framework_configs}
        offered |= {fc for s in scenarios for fc in s.framework_configs if fc} | {NO_PLUGIN}
        for name in recipes:
            if name not in offered:
                raise BenchError(f"--recipes: no scenario runs '{name}'{closest(name, sorted(offered))}")
    for value, option in ((effective_batch_sizes, "--effective-batch-size"), (num_gpus, "--num-gpus")):
        if not value or any(int(v) < 1 for v in value):
            raise BenchError(f"{option}: expected positive integers, got {list(value)}")

    cells: list[Cell] = []
    impossible: list[str] = []
    seen: set[str] = set()
    for scenario in scenarios:
        if run_only_scenarios and scenario.name not in run_only_scenarios:
            continue
        arguments = {**(defaults or {}), **scenario.arguments, **(overrides or {})}
        arguments.pop("output_dir", None)  # each cell gets its own --output-dir
        if isinstance(arguments.get("target_modules"), str) and " " in arguments["target_modules"].strip():
            arguments["target_modules"] = arguments["target_modules"].split()
        axes = {}
        for axis in MATRIX_AXES:
            axes[axis] = _as_list(arguments.pop(axis, None))
        if models:
            axes["model_name_or_path"] = list(models)
        if axes["model_name_or_path"] == [None]:
            raise BenchError(
                f"scenario '{scenario.name}' has no model_name_or_path (set it in the scenario, the defaults file, "
                "or with --models)"
            )
        for shortname in scenario.framework_configs:
            recipe = _recipe_for(scenario, shortname, arguments)
            chosen_by_recipe = bool(recipes) and (recipe in recipes or (shortname or NO_PLUGIN) in recipes)
            if recipes and not chosen_by_recipe:
                continue
            # a slow scenario runs when named: by --run-only-scenarios, or one of its shortnames in --recipes
            named = bool(run_only_scenarios and scenario.name in run_only_scenarios) or (chosen_by_recipe and shortname)
            if scenario.slow and not named:
                continue
            for model, data, effective, gpus in itertools.product(
                axes["model_name_or_path"], axes["training_data_path"], effective_batch_sizes, num_gpus
            ):
                try:
                    effective_now, per_device, accumulation = _batch_sizes(scenario, arguments, int(effective),
                                                                           int(gpus))
                except _Impossible as e:
                    if str(e) not in impossible:
                        impossible.append(str(e))
                    continue
                cell_args = {"model_name_or_path": str(model)}
                if data is not None:
                    cell_args["training_data_path"] = data
                cell_args.update(arguments)
                cell_args["per_device_train_batch_size"] = per_device
                if accumulation is not None:
                    cell_args["gradient_accumulation_steps"] = accumulation
                cell = Cell(scenario.name, shortname, recipe, str(model), int(gpus), effective_now, per_device,
                            cell_args)
                if cell.cell_id not in seen:
                    seen.add(cell.cell_id)
                    cells.append(cell)
    return cells, impossible
