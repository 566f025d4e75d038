"""Test environment: set before anything imports triton, diffusers or deepspeed."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DS_BUILD_OPS", "0")


def pytest_terminal_summary(terminalreporter):
    """Numbers a test measured against a reference implementation (``record_property("agreement", text)``, e.g.
    the TF tier of tests/test_eval_tf.py), printed after the run, also from xdist workers."""
    lines = [f"{rep.nodeid}: {value}" for key in ("passed", "failed") for rep in terminalreporter.stats.get(key, [])
             if getattr(rep, "when", "call") == "call"
             for name, value in getattr(rep, "user_properties", []) if name == "agreement"]
    if lines:
        terminalreporter.section("measured agreement")
        for line in lines:
            terminalreporter.write_line(line)
