"""benchmarks/train/profile_step.py: categories of kernel names and a CPU smoke run of the whole script."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "train"))
import profile_step as P  # noqa: E402


@pytest.mark.parametrize("name,cat", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm>", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<72>>", "attention"),
    ("triton_per_fused_add_native_layer_norm_0", "triton"),
    ("_ln_modulate_fwd_kernel", "ours"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16>", "norm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise/reduce"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>", "copy/cast"),
])
def test_categories(name, cat):
    assert P.categorize(name) == cat


def test_smoke_run_writes_consistent_tables(tmp_path):
    assert P.main(["--smoke", "--models", "MAE-tiny", "--kernels", "torch", "--out", str(tmp_path)]) == 0
    s = json.load(open(tmp_path / "profile_MAE-tiny_torch_eager.json"))
    assert s["model"] == "MAE-tiny" and s["kernels"] == "torch" and s["mode"] == "eager"
    assert s["total_ms"] > 0
    assert sum(c["ms"] for c in s["categories"].values()) == pytest.approx(s["total_ms"], rel=1e-6)
    assert s["categories"]["matmul"]["share"] > 0.05          # linear layers of a real transformer step
    assert s["top"] and all(t["ms"] <= s["top"][0]["ms"] for t in s["top"])
    md = (tmp_path / "profile_MAE-tiny_torch_eager.md").read_text()
    assert "| matmul |" in md and "device time per step" in md
