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


def _specs():
    """(name, jit fn, signature, constexprs, num_warps) for the model shapes (D = 1152, p = 2, C = 4)."""
    from . import adaln, decoder_unshuffle, masked_loss, patch_embed

    out = []
    for dt in ("fp32", "bf16"):
        for scatter in (False, True):
            out.append((f"patch_gather[{dt},scatter={scatter}]", patch_embed._patch_gather_kernel,
                        {"lat_ptr": f"*{dt}", "ids_ptr": "*i64", "pat_ptr": f"*{dt}", "K": "i32", "H": "i32",
                         "W": "i32", "GW": "i32", "C": "constexpr", "PATCH": "constexpr", "P": "constexpr",
                         "BLOCK_K": "constexpr", "BLOCK_P": "constexpr", "SCATTER": "constexpr"},
                        {"C": 4, "PATCH": 2, "P": 16, "BLOCK_K": 256, "BLOCK_P": 16, "SCATTER": scatter}, 4))
        out.append((f"pos_gather_add[{dt}]", patch_embed._pos_gather_add_kernel,
                    {"y_ptr": f"*{dt}", "pos_ptr": "*fp32", "ids_ptr": "*i64", "out_ptr": "*fp32", "K": "i32",
                     "D": "i32", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr"},
                    {"BLOCK_K": 2, "BLOCK_D": 2048}, 4))
        for bwd in (False, True):
            out.append((f"unshuffle[{dt},bwd={bwd}]", decoder_unshuffle._unshuffle_kernel,
                        {"x_ptr": f"*{dt}", "mt_ptr": f"*{dt}", "ids_ptr": "*i64", "pos_ptr": "*fp32",
                         "out_ptr": "*fp32", "part_ptr": "*fp32", "K": "i32", "L": "i32", "D": "i32",
                         "HAS_POS": "constexpr", "BACKWARD": "constexpr", "BLOCK_T": "constexpr",
                         "BLOCK_D": "constexpr"},
                        {"HAS_POS": not bwd, "BACKWARD": bwd, "BLOCK_T": 2, "BLOCK_D": 2048}, 4))
            for norm, per_image in ((True, False), (True, True), (False, False)):
                out.append((f"masked_loss[{dt},bwd={bwd},norm={norm},per_image={per_image}]",
                            masked_loss._masked_loss_kernel,
                            {"pred_ptr": f"*{dt}", "lat_ptr": "*fp32", "mask_ptr": "*fp32", "stats_ptr": "*fp32",
                             "part_ptr": "*fp32", "coef_ptr": "*fp32", "grad_ptr": f"*{dt}", "L": "i32",
                             "H": "i32", "W": "i32", "GW": "i32", "eps": "fp32", "C": "constexpr",
                             "PATCH": "constexpr", "P": "constexpr", "NORM": "constexpr",
                             "PER_IMAGE": "constexpr", "BACKWARD": "constexpr", "BLOCK_L": "constexpr",
                             "BLOCK_P": "constexpr"},
                            {"C": 4, "PATCH": 2, "P": 16, "NORM": norm, "PER_IMAGE": per_image,
                             "BACKWARD": bwd, "BLOCK_L": 256, "BLOCK_P": 16}, 4))
            out.append((f"gated_residual[{dt},bwd={bwd}]", adaln._gated_residual_kernel,
                        {"x_ptr": "*fp32", "gate_ptr": f"*{dt}", "y_ptr": f"*{dt}", "out_ptr": "*fp32",
                         "dy_ptr": f"*{dt}", "pg_ptr": "*fp32", "T": "i32", "D": "i32",
                         "BACKWARD": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"},
                        {"BACKWARD": bwd, "BLOCK_T": 2, "BLOCK_D": 2048}, 4))
        for aff in (True, False):
            out.append((f"ln_mod_fwd[{dt},affine={aff}]", adaln._ln_mod_fwd_kernel,
                        {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "shift_ptr": f"*{dt}",
                         "scale_ptr": f"*{dt}", "y_ptr": f"*{dt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                         "T": "i32", "D": "i32", "eps": "fp32", "HAS_W": "constexpr", "HAS_B": "constexpr",
                         "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"},
                        {"HAS_W": aff, "HAS_B": aff, "BLOCK_T": 2, "BLOCK_D": 2048}, 4))
            out.append((f"ln_mod_bwd[{dt},affine={aff}]", adaln._ln_mod_bwd_kernel,
                        {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "scale_ptr": f"*{dt}",
                         "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dy_ptr": f"*{dt}", "dx_ptr": f"*{dt}",
                         "pw_ptr": "*fp32", "pb_ptr": "*fp32", "psh_ptr": "*fp32", "psc_ptr": "*fp32",
                         "T": "i32", "D": "i32", "ROWS_PER_CHUNK": "i32", "HAS_W": "constexpr",
                         "HAS_B": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"},
                        {"HAS_W": aff, "HAS_B": aff, "BLOCK_T": 1, "BLOCK_D": 2048}, 4))
    return out


def compile_all(arch: int = 90, only: str = "") -> list:
    """Compile every spec for sm_<arch>; returns [(name, seconds, n_regs or None)]. Raises on failure."""
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
        results.append((name, time.time() - t0, len(k.asm["cubin"])))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int, e.g. 80, 90")
    ap.add_argument("--only", default="", help="compile only kernels whose name contains this text")
    args = ap.parse_args(argv)
    for name, sec, size in compile_all(args.arch, args.only):
        print(f"ok  {name:60s} {sec:6.2f}s  cubin {size} B")
    print(f"all kernels compile for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
