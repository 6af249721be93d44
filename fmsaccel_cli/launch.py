"""``fmsaccel run``: resolve, check plugins' extras, write the config, launch torchrun."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .recipes import RecipeError, Resolved, closest, validate

TRAIN_MODULE = "fmsaccel_cli.train"


@dataclass
class LaunchOptions:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None
    resume: bool = False


def torchrun_command(config_path: Path, opts: LaunchOptions) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={opts.nproc_per_node}"]
    if opts.rdzv_endpoint:
        cmd += [f"--nnodes={opts.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={opts.rdzv_endpoint}"]
    elif opts.nnodes > 1 or opts.master_addr:
        cmd += [f"--nnodes={opts.nnodes}", f"--node-rank={opts.node_rank}",
                f"--master-addr={opts.master_addr or '127.0.0.1'}", f"--master-port={opts.master_port or 29500}"]
    elif opts.master_port:
        cmd += [f"--master-port={opts.master_port}"]
    else:
        cmd += ["--standalone"]
    cmd += ["-m", TRAIN_MODULE, str(config_path)]
    if opts.resume:
        cmd.append("--resume")
    return cmd


def missing_extras(active) -> list[tuple[str, list[str], list[str]]]:
    """[(plugin, missing modules, pip command)] for plugins whose requirements don't import here."""
    out = []
    for spec, _ in active:
        missing = spec.missing_requirements()
        if missing:
            out.append((spec.name, missing, spec.pip_command()))
    return out


def check_hardware(active, opts: LaunchOptions) -> None:
    import torch

    has_gpu = torch.cuda.is_available()
    for spec, _ in active:
        if spec.gpu_only and not has_gpu:
            raise RecipeError(f"plugin {spec.name} needs a CUDA GPU and none is visible here")
    if has_gpu and opts.nproc_per_node > torch.cuda.device_count():
        raise RecipeError(f"--nproc-per-node {opts.nproc_per_node} but only {torch.cuda.device_count()} GPU(s) here")


def install(commands: list[list[str]], assume_yes: bool, confirm) -> None:
    for cmd in commands:
        print(f"[fmsaccel] installing a missing plugin extra: {shlex.join(cmd)}", flush=True)
        if not assume_yes and not confirm("Run this pip command now?"):
            raise RecipeError("installation declined; run the command above, or pass --no-install to only print it")
        if subprocess.call(cmd) != 0:
            raise RecipeError(f"pip failed: {shlex.join(cmd)}")


def write_config(resolved: Resolved, output_dir: Path) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "fmsaccel-config.yaml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(resolved.to_yaml_dict(), sort_keys=False))
    tmp.replace(path)
    return path


USER_ERROR_MARK = b"[fmsaccel] error:"


def stream(cmd: list[str]) -> int:
    """Run the child in its own process group, forward SIGINT/SIGTERM, return its exit code.

    stderr is relayed as it comes. Once a worker has printed a one-line user error
    (``[fmsaccel] error: ...``), torchrun's own report of the failed worker (a
    traceback from inside torch.distributed) is dropped: the user already has the line
    that says what to fix.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FMSACCEL_LAUNCHED_AT": repr(time.time())}  # startup phase
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    child = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)

    def forward(signum, _frame):
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        user_error = _relay_stderr(child.stderr)
        code = child.wait()
        return 2 if user_error and code != 0 else code  # torchrun turns a worker's 2 into 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _relay_stderr(pipe) -> bool:
    """Copy ``pipe`` to our stderr through the end of the first user-error line; True if there was one.

    Partial lines (progress bars end in ``\\r``) are forwarded at once; only the current
    line is kept, to find the mark even when it arrives in pieces.
    """
    out = sys.stderr.buffer
    line, marked = b"", False
    while chunk := os.read(pipe.fileno(), 65536):
        pos = 0
        while pos < len(chunk):
            newline = chunk.find(b"\n", pos)
            piece = chunk[pos:] if newline < 0 else chunk[pos:newline + 1]
            out.write(piece)
            line = (line + piece)[-4096:]
            marked = marked or USER_ERROR_MARK in line
            if newline < 0:
                break
            if marked:  # the error line is complete: drop the rest (torchrun's report)
                out.flush()
                _drain(pipe)
                return True
            line, pos = b"", newline + 1
        out.flush()
    return marked


def _drain(pipe) -> None:
    while os.read(pipe.fileno(), 65536):
        pass


def prepare(resolved: Resolved, opts: LaunchOptions):
    """Validate everything a run needs (no model built); returns the active plugins."""
    active = validate(resolved)
    if opts.nproc_per_node < 1:
        raise RecipeError("--nproc-per-node must be at least 1")
    from . import distributed  # the `distributed` section against the world size and the plugins

    resolved.notes += distributed.check(resolved.args, active, opts.nproc_per_node * max(opts.nnodes, 1),
                                        resolved.sources)
    if opts.nnodes > 1 and not (opts.master_addr or opts.rdzv_endpoint):
        raise RecipeError(f"--nnodes {opts.nnodes} needs --master-addr (node 0's address) or --rdzv-endpoint")
    if not 0 <= opts.node_rank < max(opts.nnodes, 1):
        raise RecipeError(f"--node-rank {opts.node_rank} is not below --nnodes {opts.nnodes}")
    args = resolved.args
    out = args.get("output_dir")
    if not isinstance(out, str) or not out:
        raise RecipeError(f"output_dir must be a folder path (got {out!r})")
    if Path(out).exists() and not Path(out).is_dir():
        raise RecipeError(f"output_dir {out} exists and is not a folder")
    from . import data, models
    from .train import DTYPES, build_sft_config  # the real SFTConfig checks values here, not in the child

    if str(args.get("torch_dtype", "bfloat16")) not in DTYPES:
        raise RecipeError(f"torch_dtype {args['torch_dtype']!r} is not one of {', '.join(DTYPES)}"
                          f"{closest(args['torch_dtype'], DTYPES)}")
    try:
        data.check_path(args.get("training_data_path"))
        models.check_model(args.get("model_name_or_path"))
    except (data.DataError, FileNotFoundError) as e:
        raise RecipeError(str(e)) from None

    try:
        build_sft_config(resolved.args)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"invalid training arguments: {str(e).splitlines()[0]}") from None
    return active
