"""Worker for tests/test_recipes.py: the classifier on synthetic latents with data.global_batch_size=16, run under
torchrun with any number of ranks (ddp, fp32). Extra ``key=value`` arguments override the config.

    python -m torch.distributed.run --nproc_per_node N tests/_helpers_batch.py --out DIR [key=value ...]

Writes DIR/metrics.jsonl (the trainer) and DIR/plan.json (rank 0), prints TRAIN_HELPER_OK on every rank."""
import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers_train as H  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="output folder of the run")
    ap.add_argument("overrides", nargs="*", help="extra config overrides")
    a = ap.parse_args()
    from usp_scale.config import load_config
    from usp_scale import runtime as D
    from usp_scale.training.trainer import Trainer

    ov = [f"output_dir={a.out}", "task=cls", "model.name=vit_tiny_patch16_vae", "model.img_size=8",
          "model.num_classes=10", "model.drop_path_rate=0.0", "data.synthetic_samples=64", "data.global_batch_size=16",
          "engine.name=ddp", "engine.precision=fp32", "optim.fused=false", "optim.blr=0.2", "optim.beta2=0.999",
          "optim.layer_decay=0.75", "schedule.epochs=2", "schedule.warmup_epochs=1", "cls.smoothing=0.1", "log_every=1",
          "eval_every_epochs=0", "checkpoint.every_steps=0", "checkpoint.export=false",
          "checkpoint.export_official=false", "plot=false", "tensorboard=false", *a.overrides]
    cfg = load_config(os.path.join(H.REPO, "configs", "debug", "synthetic_pretrain.yaml"), ov)
    trainer = Trainer(cfg)
    trainer.fit()
    if trainer.is_main:
        with open(os.path.join(a.out, "plan.json"), "w") as f:
            json.dump(dataclasses.asdict(trainer.batch_plan), f)
    D.barrier()
    print(H.OK, trainer.rank, flush=True)
    sys.stderr.flush()
    os._exit(0)  # as the other workers: gloo's teardown at interpreter exit occasionally aborts after success


if __name__ == "__main__":
    main()
