"""The triton kernels of tests/test_engine_kernels_gpu.py in triton's interpreter, on the CPU.

A local check while writing kernels without a GPU: it needs ``triton``
installed (CI does not install it, so there it skips) and runs the kernels
with ``TRITON_INTERPRET=1`` at smaller sizes than the GPU tests, against the
same torch ops with the same tolerances. Where CUDA is present the GPU tests
compile the kernels for real and this module skips.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CUDA present: tests/test_engine_kernels_gpu.py runs these kernels compiled", allow_module_level=True)
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    # triton's own library functions are jit'd when it is imported: too late to interpret them
    pytest.skip("triton was imported without TRITON_INTERPRET=1 in this process", allow_module_level=True)


def _interpreted_kernels():
    """The kernel modules, imported with TRITON_INTERPRET=1 (read when each @triton.jit runs)."""
    # numpy >= 2.4 refuses int() of the 1-element arrays triton 3.6's interpreter makes of
    # scalar arguments (a loop bound, say); take the element instead
    import triton.runtime.interpreter as ti

    patch = ti._patch_lang_tensor
    if not getattr(patch, "_scalar_index", False):
        def patched(tensor, scope):
            patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
        patched._scalar_index = True
        ti._patch_lang_tensor = patched
    from runners.engine.ops import triton_fp8, triton_moe  # noqa: F401
    assert triton_moe._INTERPRETED


# Stays set: triton reads it again at launch. Without CUDA nothing else here can run triton anyway.
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
_interpreted_kernels()

from test_engine_kernels_gpu import check_act_quant, check_fp8_linear, check_moe  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DTYPES = [torch.float32, torch.bfloat16]
# (E, k, T) at hidden 256, intermediate 128: interpreted programs are slow (about 3 minutes
# in all on 2 cores); T = 512 and the flash sizes are left to the GPU tests
CASES = [(32, 2, 1), (32, 8, 7), (256, 2, 1)]


@pytest.mark.parametrize("fmt", ["dense", "fp8", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("E,k,T", CASES)
def test_fused_moe(E, k, T, dtype, fmt):
    check_moe(fmt, dtype, E, k, T, 256, 128, "cpu")


@pytest.mark.parametrize("fmt", ["dense", "fp8", "fp4"])
def test_fused_moe_more_rows_per_expert(fmt):
    check_moe(fmt, torch.bfloat16, 64, 6, 32, 256, 128, "cpu")


@pytest.mark.parametrize("fmt", ["dense", "fp8", "fp4"])
@pytest.mark.parametrize("mode", ["skewed", "one"])
def test_fused_moe_empty_experts_and_long_runs(mode, fmt):
    check_moe(fmt, torch.bfloat16, 16, 3, 40, 320, 160, "cpu", mode=mode)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_act_quant_bitwise(dtype, monkeypatch):
    from runners.engine import faults

    check_act_quant((7, 300), dtype, "cpu")
    monkeypatch.setattr(faults, "_ACTIVE", frozenset({"act_scale_round_nearest"}))
    check_act_quant((7, 300), dtype, "cpu", seed=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("M,N,K", [(1, 256, 1024), (7, 200, 300), (40, 128, 256)])
def test_fp8_linear(M, N, K, dtype):
    check_fp8_linear(M, N, K, dtype, "cpu")


# The interpreter says nothing about whether the kernels compile for a GPU. Triton compiles
# for a named target without one (its own ptxas), so this builds the variants the launchers
# pick for Hopper (sm_90), in a fresh process: this one interprets.
_COMPILE_SM90 = r"""
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from runners.engine.ops import triton_fp8 as f8, triton_moe as tm

def build(fn, sig, consts, warps, stages):
    full = {n: ("constexpr" if n in consts else sig[n]) for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, full, consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    assert k.asm["cubin"]

i32 = lambda *names: {n: "i32" for n in names}
for dt, tdt, ty in (("bf16", torch.bfloat16, tl.bfloat16), ("fp32", torch.float32, tl.float32)):
    act = "*" + dt
    for fmt in (tm.DENSE, tm.FP8, tm.FP4):
        q = fmt != tm.DENSE
        a, as_, h, hs = ("*fp8e4nv", "*fp32", "*fp8e4nv", "*fp32") if q else (act,) * 4
        w, ws = {tm.DENSE: (act, act), tm.FP8: ("*fp8e4nv", "*u8"), tm.FP4: ("*u8", "*u8")}[fmt]
        for rows in ((1, 400) if dt == "bf16" else (1,)):  # decode and prefill tiles
            c = tm._config(rows * 256, 256, tdt, q)
            build(tm._gate_up_kernel, dict(a_ptr=a, as_ptr=as_, w_ptr=w, ws_ptr=ws, h_ptr=h, hs_ptr=hs,
                  order_ptr="*i64", blk_ptr="*i32", limit="fp32", **i32("n_blocks", "top_k", "D", "I", "stride_a",
                  "stride_as", "stride_we", "stride_wn", "stride_se", "stride_sn", "stride_h", "stride_hs")),
                  dict(BM=c["BM"], BN=c["BN_up"], BK=c["BK"], GROUP=8, W_FMT=fmt, A_FP8=q, H_FP8=q, RNE=False,
                       DTYPE=ty, IEEE=dt == "fp32", UPCAST=False), c["warps"], c["stages"])
            build(tm._down_kernel, dict(h_ptr=h, hs_ptr=hs, w_ptr=w, ws_ptr=ws, y_ptr=act, order_ptr="*i64",
                  wpair_ptr="*fp32", blk_ptr="*i32", **i32("n_blocks", "D", "I", "stride_h", "stride_hs", "stride_we",
                  "stride_wn", "stride_se", "stride_sn", "stride_y")),
                  dict(BM=c["BM"], BN=c["BN_down"], BK=c["BK"], GROUP=8, W_FMT=fmt, A_FP8=q, DTYPE=ty,
                       IEEE=dt == "fp32", UPCAST=False), c["warps"], c["stages"])
    build(tm._combine_kernel, dict(y_ptr=act, out_ptr=act, **i32("T", "D", "top_k")), dict(BLOCK_D=1024), 4, 1)
    build(f8._act_quant_kernel, dict(x_ptr=act, q_ptr="*fp8e4nv", s_ptr="*fp32", **i32("M", "K", "stride_x",
          "stride_q", "stride_s")), dict(BLOCK_R=16, RNE=True), 4, 1)
    for M in (1, 512):
        c, split = f8._fp8_gemm_config(M, 4096, 4096, dt != "fp32", 132)
        build(f8._fp8_gemm_kernel, dict(a_ptr="*fp8e4nv", as_ptr="*fp32", w_ptr="*fp8e4nv", ws_ptr="*u8",
              out_ptr="*fp32" if split > 1 else act, **i32("M", "N", "K", "k_per_split", "stride_am", "stride_asm",
              "stride_wn", "stride_wsn", "stride_os", "stride_om")),
              dict(BM=c["BM"], BN=c["BN"], GROUP_M=8, FP8_DOT=dt != "fp32", UPCAST=False), c["num_warps"],
              c["num_stages"])
build(tm._align_kernel, dict(seg_end_ptr="*i64", blk_expert_ptr="*i32", blk_row0_ptr="*i32", blk_rowend_ptr="*i32",
      **i32("E", "n_blocks")), dict(BM=16, E_PAD=256, BLOCK_B=64), 4, 1)
print("compiled")
"""


def test_kernels_compile_for_hopper():
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    r = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-4000:]
