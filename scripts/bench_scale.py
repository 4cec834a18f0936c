"""Benchmark the whole pipeline as the synthetic shop grows: prepare, DataModule, training, evaluation, export.

Per size, each stage runs in a child process (this script with ``--child``), so its wall time is what
a user waits for and its peak RSS is that process's own (``os.wait4``'s ``ru_maxrss``):

* prepare: ``towerrec-prepare`` of the synthetic shop (``force=true``) into ``--root``;
* train: the DataModule's set-up (seconds, and the process's RSS right after it), ``--steps`` plain
  training steps after ``--warmup`` (positions/s: non-padding targets, as in ``bench_train.py``),
  evaluation of the validation users by full ranking (all of them, or a fixed sample of
  ``--eval-users`` when there are more), and one Lightning step to write a checkpoint;
* export: ``towerrec-export`` of that checkpoint (HNSW, the default index) with a 200-query recall check.

    python scripts/bench_scale.py --sizes 1M                       # the 1M row only
    python scripts/bench_scale.py --sizes 1M,10M,100M --root /tmp/scale --eval-users 100000

Users and items grow with the interactions (``SIZES``); the scale runs use ``data.image_size=16``
(the table says so). Everything is written under ``--root`` (a temporary folder by default, removed
at the end unless ``--keep``). The machine may be shared: every row carries the load average.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT_TAG = "BENCH_RESULT "
#: name -> (interactions, users, items)
SIZES = {
    "1M": (1_000_000, 50_000, 10_000),
    "10M": (10_000_000, 500_000, 50_000),
    "100M": (100_000_000, 5_000_000, 200_000),
}
IMAGE_SIZE = 16


def data_overrides(size: str, root: Path) -> list[str]:
    n, users, items = SIZES[size]
    return [
        f"data.source.n_interactions={n}",
        f"data.source.n_users={users}",
        f"data.source.n_items={items}",
        f"data.image_size={IMAGE_SIZE}",
        f"data.processed_dir={root / size / 'processed'}",
    ]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    """This process's peak RSS so far (``VmHWM``), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _StagePeaks(logging.Handler):
    """Notes the process's RSS and peak RSS (MB) at every log record of the towerrec loggers: the
    memory profile of a stage by its log lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.stages: list[tuple[str, float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.stages.append((record.getMessage()[:70], round(_rss_mb()), round(_peak_mb())))


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from towerrec import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


# ----------------------------------------------------------------------------- children
def child_prepare(size: str, root: Path, args) -> dict:
    from towerrec.data.build import prepare

    cfg = _compose("prepare", data_overrides(size, root))
    prepare(cfg.data, force=True, workers=args.workers)
    return {}


def child_train(size: str, root: Path, args) -> dict:
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf, open_dict

    from towerrec.models.two_tower import TwoTowerModule
    from towerrec.ranking import aggregate, rank_metrics

    torch.set_num_threads(args.threads)
    cfg = _compose("train", [*data_overrides(size, root), "logger=none", "callbacks=none", *args.overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / size / "run")
    L.seed_everything(cfg.seed)
    rss0 = _rss_mb()
    t = time.perf_counter()
    dm = instantiate(cfg.datamodule)
    dm.setup()
    setup_s, setup_rss = time.perf_counter() - t, _rss_mb()
    stages = [("set-up", round(setup_rss), round(_peak_mb()))]
    OmegaConf.set_struct(cfg, False)
    cfg.model.meta = dm.meta
    model = TwoTowerModule.from_config(cfg.model)
    model.attach_features(dm.item_features)
    model.log = lambda *a, **k: None
    model.train()
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    loader = iter(dm.train_dataloader())
    pos = 0
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            pos, t = 0, time.perf_counter()
        batch = next(loader)
        loss = model.training_step(batch, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pos += int((batch["targets"] != 0).sum())
    train_pos_s = pos / (time.perf_counter() - t)
    stages.append(("training steps", round(_rss_mb()), round(_peak_mb())))

    model.eval()
    split = dm.val_split
    rows = torch.arange(len(split))
    if args.eval_users and len(split) > args.eval_users:
        rows = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[: args.eval_users].sort().values
    t = time.perf_counter()
    with torch.no_grad():  # as validation runs (without it autograd kept every chunk's user-tower graph)
        if len(rows) == len(split):  # every user: the evaluation's own path, histories cut in chunks
            topk = model.rank_split(split, 20, chunk_size=dm.eval_batch_size)
        else:
            topk = model.rank(split.history[rows], 20, chunk_size=dm.eval_batch_size)
    # The metrics a chunk of users at a time, as the evaluator computes them ((U, k, T) comparisons).
    chunk = 65_536
    ndcg = aggregate({"ndcg@20": torch.cat([
        rank_metrics(topk[lo : lo + chunk], split.targets[rows[lo : lo + chunk]], [20])["ndcg@20"]
        for lo in range(0, len(rows), chunk)
    ])})["ndcg@20"]  # fmt: skip
    eval_s = time.perf_counter() - t
    stages.append(("evaluation", round(_rss_mb()), round(_peak_mb())))

    ckpt = root / size / "run" / "model.ckpt"
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(ckpt.parent))
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(str(ckpt))
    return {
        "windows": len(dm.train_data), "val_users": len(split), "eval_users": len(rows),
        "setup_s": setup_s, "setup_rss_mb": setup_rss, "rss_before_setup_mb": rss0,
        "train_pos_s": train_pos_s, "eval_users_s": len(rows) / eval_s, "val_ndcg20": float(ndcg),
        "stages": [*stages, ("Lightning step + checkpoint", round(_rss_mb()), round(_peak_mb()))],
    }


def child_export(size: str, root: Path, args) -> dict:
    from hydra.utils import instantiate

    from towerrec.retrieval.writer import export_index

    cfg = _compose("export", ["ckpt_path=unused"])
    peaks = _StagePeaks()
    logger = logging.getLogger("towerrec")
    logger.setLevel(logging.INFO)
    logger.addHandler(peaks)
    export_index(root / size / "run" / "model.ckpt", instantiate(cfg.index), root / size / "export", n_queries=200,
                 overwrite=True, users=args.export_users)
    return {"stages": peaks.stages}


CHILDREN = {"prepare": child_prepare, "train": child_train, "export": child_export}


# ----------------------------------------------------------------------------- parent
def run_child(stage: str, size: str, root: Path, argv: list[str]) -> dict:
    """Run one stage in a child; its result, wall seconds and peak RSS (MB)."""
    cmd = [sys.executable, __file__, "--child", stage, "--sizes", size, "--root", str(root), *argv]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{stage} at {size} failed:\n{out[-3000:]}")
    result = next((json.loads(line[len(RESULT_TAG):]) for line in out.splitlines() if line.startswith(RESULT_TAG)), {})
    return {**result, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1M", help=f"comma-separated, of {list(SIZES)}")
    p.add_argument("--root", default=None, help="where the data, checkpoints and exports go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep --root afterwards")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads of the training child")
    p.add_argument("--workers", type=int, default=2, help="prepare's image-rendering processes")
    p.add_argument("--eval-users", type=int, default=100_000, help="validation users scored when there are more")
    p.add_argument("--overrides", nargs="*", default=[], help="extra train-config overrides")
    p.add_argument("--export-users", action="store_true", help="export the customers too (users=true)")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = p.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        p.error(f"--sizes: unknown {unknown}, expected some of {list(SIZES)}")
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="towerrec_bench_scale_"))

    if args.child:
        result = CHILDREN[args.child](sizes[0], root, args)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return

    argv = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
            "--workers", str(args.workers), "--eval-users", str(args.eval_users)]
    if args.export_users:
        argv += ["--export-users"]
    if args.overrides:
        argv += ["--overrides", *args.overrides]
    print(f"# towerrec scaling benchmark\n\nCPUs: {os.cpu_count()}; images {IMAGE_SIZE}x{IMAGE_SIZE}; "
          f"training {args.steps} steps after {args.warmup} on {args.threads} threads; load average at start: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| interactions | users | items | prepare s | prepare peak RSS GB | DataModule set-up s | RSS after set-up GB "
          "| windows | training positions/s | evaluated users (of val) | evaluation users/s | val NDCG@20 "
          "| train child peak RSS GB | export s | export peak RSS GB | load avg |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    profiles = []
    try:
        for size in sizes:
            n, users, items = SIZES[size]
            prep = run_child("prepare", size, root, argv)
            train = run_child("train", size, root, argv)
            export = run_child("export", size, root, argv)
            gb = 1024
            print(f"| {n:,} | {users:,} | {items:,} | {prep['wall_s']:.1f} | {prep['peak_rss_mb'] / gb:.2f} | "
                  f"{train['setup_s']:.1f} | {train['setup_rss_mb'] / gb:.2f} | {train['windows']:,} | "
                  f"{train['train_pos_s']:,.0f} | {train['eval_users']:,} ({train['val_users']:,}) | "
                  f"{train['eval_users_s']:,.0f} | {train['val_ndcg20']:.4f} | {train['peak_rss_mb'] / gb:.2f} | "
                  f"{export['wall_s']:.1f} | {export['peak_rss_mb'] / gb:.2f} | "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} |", flush=True)
            profiles.append((size, train["stages"], export["stages"]))
        print("\nRSS by stage (MB: RSS then, the process's peak so far), from the children's own /proc/self/status:")
        for size, train_stages, export_stages in profiles:
            for child, stages in (("train", train_stages), ("export", export_stages)):
                print(f"- {size} {child}: " + "; ".join(f"{name} {rss:.0f} / {peak:.0f}" for name, rss, peak in stages))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
