"""Triton kernels must not recompile when a step brings a new token count.

Triton specialises integer arguments that are 1 or divisible by 16, so a kernel launched eagerly
(the fused loss, the final norm, GPTQ outside a compiled layer) compiles a new variant the first time
a step's token count is a multiple of 16: a pause in the middle of training, and an outlier step in a
short benchmark. Every argument that follows the token count is declared ``do_not_specialize``.

Checked in a child process with the real JIT (the kernel tests run Triton's interpreter, whose
functions do not keep the declaration, and importing the kernels here would fix that mode for them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import REPO

TOKEN_COUNT_ARGUMENTS = {
    "fmsaccel_foak.ops.cross_entropy": {"_ce_stats_kernel": ["n_rows"], "_ce_grad_kernel": ["n_rows"]},
    "fmsaccel_foak.ops.rms_norm": {"_rms_norm_fwd_kernel": ["n_rows"],
                                   "_rms_norm_bwd_kernel": ["n_rows", "rows_per_program"]},
    "fmsaccel_foak.ops.rope": {"_rope_kernel": ["n_tokens", "seq_len", "sc_b", "sp_b"]},
    "fmsaccel_foak.ops.swiglu": {"_swiglu_fwd_kernel": ["n_rows"], "_swiglu_bwd_kernel": ["n_rows"]},
    "fmsaccel_peft.gptq.kernels": {"_fused_matmul_kernel": ["M"], "_fused_grad_input_kernel": ["M"]},
    "fmsaccel_moe.triton_kernels": {"_expert_mm_kernel": ["num_m_tiles"], "_swiglu_kernel": ["rows"],
                                    "_swiglu_backward_kernel": ["rows"]},
}

CHILD = """
import importlib, json, sys
wanted = json.loads(sys.argv[1])
out = {}
for module, kernels in wanted.items():
    m = importlib.import_module(module)
    for name in kernels:
        fn = getattr(m, name)
        out[f"{module}.{name}"] = sorted(p.name for p in fn.params if p.do_not_specialize)
print(json.dumps(out))
"""


def test_token_count_arguments_are_not_specialised():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    plugins = [str(p) for p in sorted((REPO / "plugins").iterdir()) if p.is_dir()]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *plugins, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(TOKEN_COUNT_ARGUMENTS)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    declared = json.loads(out.stdout.strip().splitlines()[-1])
    for module, kernels in TOKEN_COUNT_ARGUMENTS.items():
        for name, arguments in kernels.items():
            assert declared[f"{module}.{name}"] == sorted(arguments), (module, name)
