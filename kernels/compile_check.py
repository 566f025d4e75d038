"""Ahead-of-time compile every kernel for a CUDA architecture, without a GPU.

``python -m usp_scale.kernels.compile_check --arch 90`` runs Triton's full pipeline (TTIR, TTGIR, LLVM,
PTX, cubin through the bundled ptxas) for each kernel at the shapes and dtypes the models use. It catches
what the CPU interpreter lets through (non-constexpr control flow, type errors, register blow-ups it
cannot see). It must run with TRITON_INTERPRET unset (the interpreter replaces @triton.jit).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def _specs(N: int = 256, L: int = 196, D: int = 1152, Dd: int = 512, C: int = 4, patch: int = 2):
    """(name, jit fn, signature, constexprs, num_warps) with the tile sizes and warps the wrappers pick on
    a GPU for the model shapes (MAE-XL: 196 tokens, 49 kept, D 1152, decoder 512; DiT-XL/2: 256 x 1152)."""
    from . import adaln, decoder_unshuffle, masked_loss, patch_embed
    from ._common import next_pow2, num_warps_for, rows_per_program

    K = L // 4
    P = patch * patch * C
    bp = next_pow2(P)
    out = []
    import triton.language as tl

    for dt in ("fp32", "bf16"):
        bk = rows_per_program(bp, K)
        for scatter, conv in ((False, False), (True, True)):
            out.append((f"patch_gather[{dt},scatter={scatter}]", patch_embed._patch_gather_kernel,
                        {"lat_ptr": f"*{dt}", "ids_ptr": "*i64", "pat_ptr": f"*{dt}", "K": "i32", "H": "i32",
                         "W": "i32", "GW": "i32", "ID_STRIDE": "i32", "C": "constexpr", "PATCH": "constexpr",
                         "P": "constexpr", "BLOCK_K": "constexpr", "BLOCK_P": "constexpr", "SCATTER": "constexpr",
                         "CONV_ORDER": "constexpr"},
                        {"C": C, "PATCH": patch, "P": P, "BLOCK_K": bk, "BLOCK_P": bp, "SCATTER": scatter,
                         "CONV_ORDER": conv}, num_warps_for(bk * bp)))
        # fused embed forward: bf16 compute with fp32 pos (autocast) or all in one dtype; P = 16 and P = 12
        for cp, save in ((C, 2), (3, 1), (C, 0)):
            Pc = patch * patch * cp
            bm, bpp, bd = patch_embed._fwd_tiling(N * K, D, Pc)
            odt = "fp32" if dt == "bf16" and save == 2 else dt
            out.append((f"embed_fwd[{dt},P={Pc},save={save}]", patch_embed._embed_fwd_kernel,
                        {"lat_ptr": "*fp32", "ids_ptr": "*i64", "w_ptr": "*fp32", "b_ptr": "*fp32",
                         "pos_ptr": "*fp32", "out_ptr": f"*{odt}", "pat_ptr": f"*{odt}", "M": "i32", "K": "i32",
                         "H": "i32", "W": "i32", "GW": "i32", "D": "i32", "P1": "i32", "ID_STRIDE": "i32", "C": "constexpr",
                         "PATCH": "constexpr", "P": "constexpr", "CDT": "constexpr", "HAS_BIAS": "constexpr",
                         "SAVE_PATCHES": "constexpr", "ONES_COL": "constexpr", "BLOCK_M": "constexpr",
                         "BLOCK_P": "constexpr", "BLOCK_D": "constexpr"},
                        {"C": cp, "PATCH": patch, "P": Pc, "CDT": tl.bfloat16 if dt == "bf16" else tl.float32,
                         "HAS_BIAS": True, "SAVE_PATCHES": save > 0, "ONES_COL": save == 2, "BLOCK_M": bm,
                         "BLOCK_P": bpp, "BLOCK_D": bd}, patch_embed._fwd_warps(bm, bd)))
        bn, bt, bkk, bd = patch_embed._dpos_tiling(N, K, L, D)
        out.append((f"embed_dpos[{dt}]", patch_embed._dpos_kernel,
                    {"g_ptr": f"*{dt}", "ids_ptr": "*i64", "dpos_ptr": "*fp32", "N": "i32", "K": "i32",
                     "L": "i32", "D": "i32", "ID_STRIDE": "i32", "BLOCK_N": "constexpr", "BLOCK_T": "constexpr",
                     "BLOCK_K": "constexpr", "BLOCK_D": "constexpr"},
                    {"BLOCK_N": bn, "BLOCK_T": bt, "BLOCK_K": bkk, "BLOCK_D": bd}, num_warps_for(bn * bt * bd)))
        _, bt, bdd = decoder_unshuffle._grid(N, L, Dd)
        bl = rows_per_program(bp, L, gpu_elems=2048)
        for bwd in (False, True):
            if bwd:
                _, _, ubt, ubd = decoder_unshuffle._bwd_tiling(N, L, Dd, torch.device("cpu"))
                out.append((f"unshuffle_bwd[{dt}]", decoder_unshuffle._unshuffle_bwd_kernel,
                            {"gx_ptr": f"*{dt}", "ids_ptr": "*i64", "go_ptr": f"*{dt}", "part_ptr": "*fp32",
                             "K": "i32", "L": "i32", "D": "i32", "ROWS_PER_CHUNK": "i32",
                             "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"},
                            {"BLOCK_T": ubt, "BLOCK_D": ubd}, num_warps_for(ubt * ubd)))
            else:
                out.append((f"unshuffle[{dt}]", decoder_unshuffle._unshuffle_kernel,
                            {"x_ptr": f"*{dt}", "mt_ptr": f"*{dt}", "ids_ptr": "*i64", "pos_ptr": "*fp32",
                             "out_ptr": "*fp32", "K": "i32", "L": "i32", "D": "i32",
                             "HAS_POS": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"},
                            {"HAS_POS": True, "BLOCK_T": bt, "BLOCK_D": bdd}, num_warps_for(bt * bdd)))
            for norm, per_image in ((True, False), (True, True), (False, False)):
                out.append((f"masked_loss[{dt},grad={bwd},norm={norm},per_image={per_image}]",
                            masked_loss._masked_loss_kernel,
                            {"pred_ptr": f"*{dt}", "lat_ptr": "*fp32", "mask_ptr": "*fp32", "part_ptr": "*fp32",
                             "u_ptr": "*fp32", "L": "i32", "H": "i32", "W": "i32", "GW": "i32", "eps": "fp32",
                             "C": "constexpr", "PATCH": "constexpr", "P": "constexpr", "NORM": "constexpr",
                             "PER_IMAGE": "constexpr", "WRITE_GRAD": "constexpr", "BLOCK_L": "constexpr",
                             "BLOCK_P": "constexpr", "BLOCK_S": "constexpr"},
                            {"C": C, "PATCH": patch, "P": P, "NORM": norm, "PER_IMAGE": per_image,
                             "WRITE_GRAD": bwd, "BLOCK_L": bl, "BLOCK_P": bp, "BLOCK_S": 2048},
                            num_warps_for(bl * bp)))
        gt, gd = adaln._fwd_tiling(256, D)
        out.append((f"gated_residual[{dt}]", adaln._gated_residual_kernel,
                    {"x_ptr": "*fp32", "gate_ptr": f"*{dt}", "y_ptr": f"*{dt}", "out_ptr": "*fp32",
                     "T": "i32", "D": "i32", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"},
                    {"BLOCK_T": gt, "BLOCK_D": gd}, num_warps_for(gt * gd)))
        _, _, gt, gd = adaln._gated_bwd_tiling(N, 256, D, torch.device("cpu"))
        out.append((f"gated_residual_bwd[{dt}]", adaln._gated_bwd_kernel,
                    {"go_ptr": "*fp32", "gate_ptr": f"*{dt}", "y_ptr": f"*{dt}", "dy_ptr": f"*{dt}",
                     "pg_ptr": "*fp32", "T": "i32", "D": "i32", "ROWS_PER_CHUNK": "i32",
                     "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"},
                    {"BLOCK_T": gt, "BLOCK_D": gd}, num_warps_for(gt * gd)))
        out.append((f"loss_finalize[{dt}]", masked_loss._loss_finalize_kernel,
                    {"part_ptr": "*fp32", "sums_ptr": "*fp32", "loss_ptr": f"*{dt}", "n_parts": "i32",
                     "BLOCK": "constexpr"}, {"BLOCK": 512}, 4))
        out.append((f"loss_grad[{dt}]", masked_loss._loss_grad_kernel,
                    {"u_ptr": "*fp32", "gl_ptr": f"*{dt}", "sums_ptr": "*fp32", "out_ptr": f"*{dt}",
                     "numel": "i32", "BLOCK": "constexpr"}, {"BLOCK": 4096}, 8))
        for aff in (True, False):
            bt, bd = adaln._fwd_tiling(256, D)
            out.append((f"ln_mod_fwd[{dt},affine={aff}]", adaln._ln_mod_fwd_kernel,
                        {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "shift_ptr": f"*{dt}",
                         "scale_ptr": f"*{dt}", "y_ptr": f"*{dt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                         "T": "i32", "D": "i32", "eps": "fp32", "HAS_W": "constexpr", "HAS_B": "constexpr",
                         "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"},
                        {"HAS_W": aff, "HAS_B": aff, "BLOCK_T": bt, "BLOCK_D": bd}, num_warps_for(bt * bd)))
            _, _, bt, bd = adaln._bwd_tiling(N, 256, D, torch.device("cpu"))
            out.append((f"ln_mod_bwd[{dt},affine={aff}]", adaln._ln_mod_bwd_kernel,
                        {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "scale_ptr": f"*{dt}",
                         "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dy_ptr": f"*{dt}", "dx_ptr": f"*{dt}",
                         "pw_ptr": "*fp32", "pb_ptr": "*fp32", "psh_ptr": "*fp32", "psc_ptr": "*fp32",
                         "T": "i32", "D": "i32", "ROWS_PER_CHUNK": "i32", "HAS_W": "constexpr",
                         "HAS_B": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"},
                        {"HAS_W": aff, "HAS_B": aff, "BLOCK_T": bt, "BLOCK_D": bd}, num_warps_for(bt * bd)))
    return out


def _ptxas_usage(ptx: str, arch: int) -> str:
    """'regs R, spills S B' from the bundled ptxas -v, or '' when it cannot be run."""
    import re
    import subprocess
    import tempfile

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        r = subprocess.run([ptxas, "-v", "--gpu-name", gpu, f.name, "-o", os.devnull], capture_output=True,
                           text=True, timeout=60)
    finally:
        os.unlink(f.name)
    regs = re.findall(r"Used (\d+) registers", r.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", r.stderr)
    return f"regs {regs[0] if regs else '?'}, spills {spills[0] if spills else '?'} B"


def compile_all(arch: int = 90, only: str = "") -> list:
    """Compile every spec for sm_<arch>; returns [(name, seconds, num_warps, ptxas usage)]. Raises on failure."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (run it in a separate process)")
    import triton
    from triton.backends.compiler import GPUTarget

    results = []
    for name, fn, sig, constexprs, warps in _specs():
        if only and only not in name:
            continue
        t0 = time.time()
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        try:
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
        except Exception as e:  # name the kernel variant that failed
            raise RuntimeError(f"{name} failed to compile for sm_{arch}: {e}") from e
        results.append((name, time.time() - t0, warps, _ptxas_usage(k.asm["ptx"], arch)))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int, e.g. 80, 90")
    ap.add_argument("--only", default="", help="compile only kernels whose name contains this text")
    args = ap.parse_args(argv)
    for name, sec, warps, usage in compile_all(args.arch, args.only):
        print(f"ok  {name:58s} {sec:5.2f}s  {warps} warps  {usage}")
    print(f"all kernels compile for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
