"""A launcher's normal start prints none of the libraries' known-benign start-up messages (usp_scale/runtime/quiet.py,
docs/training.md "Start-up messages"): torch's _pytree Enum deprecation (x2) and diffusers' torchao line when a VAE
is loaded, FSDP2's view-tensor warning, DeepSpeed's "No CUDA runtime" on a CPU."""
import subprocess
import sys

import pytest

import _helpers_train as H

BENIGN = ("is an Enum subclass", "Unable to import `torchao`", "returned a view tensor", "No CUDA runtime is found")


def _found(text):
    return [m for m in BENIGN if m in text]


def _run(cmd, torchrun=False):
    env = H.child_env()
    env.pop("USP_SCALE_ALL_WARNINGS", None)
    if torchrun:
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(H.free_port())] + cmd
    return subprocess.run([sys.executable] + cmd, cwd=H.REPO, env=env, capture_output=True, text=True, timeout=300)


def test_the_messages_appear_without_the_filters_and_not_with_them(tmp_path):
    """The import-time ones, cheaply: diffusers' VAE class (torchao) and DeepSpeed's cpp_extension (CUDA_HOME set,
    no CUDA device), before and after init_runtime's filters."""
    code = ("import sys\n"
            "if sys.argv[1] == 'quiet':\n"
            "    from usp_scale.runtime import quiet_benign_warnings; quiet_benign_warnings(cpu=True)\n"
            "from diffusers import AutoencoderKL\n"
            "import torch.utils.cpp_extension\n")
    env = H.child_env()
    env.pop("USP_SCALE_ALL_WARNINGS", None)
    env["CUDA_HOME"] = str(tmp_path)  # cpp_extension's message needs a CUDA_HOME (found via nvcc on GPU machines)
    loud = subprocess.run([sys.executable, "-c", code, "loud"], env=env, capture_output=True, text=True, timeout=120)
    assert loud.returncode == 0, loud.stderr
    assert _found(loud.stderr) == ["is an Enum subclass", "Unable to import `torchao`", "No CUDA runtime is found"]
    assert loud.stderr.count("is an Enum subclass") == 2
    quiet = subprocess.run([sys.executable, "-c", code, "quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and _found(quiet.stderr) == [], quiet.stderr


def test_vae_launcher_start_is_quiet(tmp_path):
    """cache_latents.py with the shipped VAE synthetic-f8 (diffusers imports torchao)."""
    from usp_scale.data.synthetic import make_synthetic

    root = str(tmp_path / "data")
    make_synthetic(root, classes=2, per_class=2, size=32, val_per_class=0, seed=1)
    p = _run(["launchers/cache_latents.py", "--data-root", root, "--views", "1", "--image-size", "32",
              "--batch-size", "4", "--num-workers", "0", "--no-progress", "--device", "cpu", "--vae-path",
              "synthetic-f8", "--out", str(tmp_path / "c1")])
    assert p.returncode == 0, p.stderr[-3000:]
    assert _found(p.stdout + p.stderr) == [], p.stderr[-3000:]


def test_fsdp2_launcher_start_is_quiet(tmp_path):
    """(DeepSpeed's plain start: tests/test_train_distributed.py::test_plain_python_launch_with_deepspeed_engine.)"""
    p = _run(["launchers/pretrain.py", "--config", "configs/debug/synthetic_pretrain.yaml",
              f"output_dir={tmp_path / 'f'}", "engine.name=fsdp2", "engine.precision=fp32", "schedule.max_steps=1",
              "optim.fused=false", "tensorboard=false"], torchrun=True)
    assert "[usp_scale] done: step 1" in p.stdout, (p.stdout + p.stderr)[-3000:]
    assert _found(p.stdout + p.stderr) == [], p.stderr[-3000:]


def test_tensorboard_events_without_importing_tensorflow(tmp_path):
    """The trainer's TensorBoard writer does not import TensorFlow (seconds of start-up per rank and its C++ log lines
    when it is installed, as in CI's TF tier): the events come from tensorboard's own stub and read back with
    tensorboard's reader."""
    pytest.importorskip("tensorboard")
    code = ("import sys, glob\n"
            "from usp_scale.training.metrics import MetricsLogger\n"
            f"log = MetricsLogger({str(tmp_path)!r}, enabled=True, tensorboard=True)\n"
            "for s in (1, 2): log.log({'step': s, 'loss': 0.5 * s})\n"
            "log.close()\n"
            "print('tensorflow' in sys.modules)\n")
    env = H.child_env()
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "False"
    assert "cpu_feature_guard" not in p.stderr and "InitializeLog" not in p.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 0.5), (2, 1.0)]
