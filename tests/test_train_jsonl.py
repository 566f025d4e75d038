"""truncate_jsonl / truncate_eval_records: what a resume does to the JSON-lines files a run appends to."""
import json

import pytest


def test_truncate_jsonl_keeps_lines_up_to_the_step_and_drops_a_torn_last_line(tmp_path):
    from usp_scale.fileio import truncate_jsonl

    p = tmp_path / "m.jsonl"
    lines = ['{"step": 1, "loss": 2.5}', '{"kind": "meta"}', '{"loss": 1.0, "step": 2}', '{"step": 3}',
             '{"step": 2, "x": 1}']
    p.write_text("\n".join(lines) + '\n{"step": 4, "lo')  # a writer killed mid-line
    assert truncate_jsonl(str(p), 2) == 2  # step 3 and the torn line
    assert p.read_text().splitlines() == [lines[0], lines[1], lines[2], lines[4]]  # kept lines unchanged
    assert truncate_jsonl(str(p), 2) == 0 and truncate_jsonl(str(tmp_path / "none.jsonl"), 2) == 0
    p.write_text('{"step": 1}\n{"step": 2, bad\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl: line 2 is not JSON"):
        truncate_jsonl(str(p), 5)


def test_truncate_eval_records_rewrites_the_txt_companion(tmp_path):
    from usp_scale.eval import make_records, write_records
    from usp_scale.eval.hook import truncate_eval_records

    ctx = {"protocol": "torch-fidelity", "sampler": "ddim", "steps": 3, "cfg_scale": 1.0, "sampling_precision": "fp32",
           "reference": "r", "feature_extractor": "usp-tiny"}
    path = str(tmp_path / "eval_metrics.jsonl")
    for step in (2, 4, 6):
        write_records(path, make_records({"fid": 10.0 + step, "num_samples": 8}, dict(ctx, step=step)))
    assert truncate_eval_records(path, 4) == 1
    assert [json.loads(line)["step"] for line in open(path)] == [2, 4]
    txt = (tmp_path / "eval_metrics.txt").read_text().splitlines()
    assert len(txt) == 2 and txt[0].startswith("fid=12 ") and txt[1].endswith("step=4")


def test_tensorboard_writer_purges_events_past_the_resumed_step(tmp_path, monkeypatch):
    """TensorBoard (when installed) opens at the first record; after a resume at step s it opens with
    purge_step=s+1, so events an interrupted run wrote past its checkpoint are hidden."""
    import sys
    import types

    opened = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            opened.append((log_dir, purge_step))
            self.scalars = []

        def add_scalar(self, k, v, step):
            self.scalars.append((k, v, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    from usp_scale.training.metrics import MetricsLogger

    fresh = MetricsLogger(str(tmp_path / "a"), enabled=True)
    assert opened == []                                     # nothing opened before the first record
    fresh.log({"step": 1, "loss": 0.5})
    assert opened == [(str(tmp_path / "a" / "tb"), None)] and fresh.tb.scalars == [("loss", 0.5, 1)]
    resumed = MetricsLogger(str(tmp_path / "b"), enabled=True)
    resumed.truncate_after(40)
    resumed.log({"step": 41, "loss": 0.25})
    assert opened[-1] == (str(tmp_path / "b" / "tb"), 41)
    off = MetricsLogger(str(tmp_path / "c"), enabled=True, tensorboard=False)
    off.log({"step": 1, "loss": 1.0})
    assert off.tb is None and len(opened) == 2
