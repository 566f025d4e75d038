"""An online dataset whose every image is unreadable (git-lfs pointer files) used to loop over empty epochs forever
with no output (issue 18 item 8): now the first epoch that yields no sample stops the run naming the folder."""
import os
import subprocess
import sys
import time

import _helpers_train as H

REPO = H.REPO
POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 12345\n"


def test_epoch_with_no_readable_image_is_refused_naming_the_folder(tmp_path):
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(6):
            (root / "train" / c / f"{i}.png").write_text(POINTER.format(f"{i:064d}"))
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "launchers", "pretrain.py"), "--config",
           os.path.join(REPO, "configs", "debug", "tiny.yaml"), f"output_dir={out}", f"data.root={root}",
           "data.batch_size=4", "schedule.epochs=1000", "schedule.warmup_epochs=0", "progress=false"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, env=H.child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr[-3000:]
    assert f"epoch 0 yielded no sample on rank 0 (data.root={root / 'train'})" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 240
