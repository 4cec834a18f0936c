"""Benchmark training: throughput per config and image-encoder mode, and one full epoch through Lightning.

Throughput: the real ``train`` config is composed in-process, the DataModule and the model are
built the way ``towerrec-train`` builds them, and ``--steps`` optimiser steps (after ``--warmup``
steps) run in a plain loop: next batch, ``model.training_step``, backward, gradient clipping as the
trainer config says, optimiser step. Sequences/s counts training windows; positions/s counts the
non-padding target positions, which is what the loss sees. The image encoder runs trainable (the
config default) and frozen (``model.item_tower.image_encoder.trainable=false``, its features cached
once per item on the first step, shown as "first step s").

Floor: in the same run, the same model's forward and backward (and optimiser step) on batches drawn
once beforehand and kept as tensors, so the floor row leaves out everything but the modules' own
work: cutting the windows from the memory-mapped sequences, the DataLoader, the batch's distinct
items (``TwoTowerModule.on_before_batch_transfer``) and the per-step Python around them.
"step / floor" is the ratio of the two rows' seconds per step. Both apply the trainer config's
``deterministic`` setting, as ``lightning.Trainer`` does (the CPU default: deterministic algorithms).

Epoch: one ``trainer.fit`` with ``max_epochs=1`` (no callbacks, no logger, no checkpoints, no
progress bar) and a timing hook, split into the training batches and the validation pass.

    python scripts/bench_train.py                                  # synthetic + hm_fusion, 20 steps
    python scripts/bench_train.py --configs synthetic --steps 50
    python scripts/bench_train.py --configs hm_fusion --overrides model.dim=32 --skip-epoch
    python scripts/bench_train.py --configs synthetic --overrides trainer=gpu   # CUDA, bf16-mixed
    python scripts/bench_train.py --threads 2,1      # torch's default intra-op threads vs one
    python scripts/bench_train.py --configs synthetic --skip-epoch --processed-root /tmp/big \
        --overrides data.source.n_users=500000 data.source.n_items=50000 data.source.n_interactions=10000000

The data is prepared first when its processed folder is missing or stale, as ``towerrec-train``
does (``--processed-root`` puts it elsewhere). The machine may be shared: every row carries the
load average, and the frozen/trainable ratio compares rows measured back to back.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from towerrec import CONFIG_DIR
from towerrec.commands.train import build

CONFIG_OVERRIDES = {"synthetic": ["experiment=synthetic"], "hm_fusion": ["experiment=hm_fusion"]}
FROZEN = "model.item_tower.image_encoder.trainable=false"
#: What the epoch run leaves out: callbacks, logger, checkpoints and the progress bar.
EPOCH_OVERRIDES = [
    "callbacks=none",
    "logger=none",
    "trainer.max_epochs=1",
    "+trainer.enable_checkpointing=false",
    "+trainer.enable_progress_bar=false",
]


def load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} {b:.2f} {c:.2f}"


def compose_train(overrides: list[str], output_dir: Path, processed_root: str | None) -> DictConfig:
    """The real train config; ``paths.output_dir`` is a temporary folder (no Hydra run here)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        if processed_root:
            cfg.data.processed_dir = str(Path(processed_root) / cfg.data.name)
    return cfg


def has_image_encoder(cfg: DictConfig) -> bool:
    return cfg.model.item_tower.get("image_encoder") is not None


@dataclass
class Throughput:
    config: str
    image: str
    steps: int
    batch_size: int
    windows: int
    step_s: float  # mean seconds per timed step
    data_s: float  # of which fetching the batch
    first_step_s: float
    seqs_per_s: float
    pos_per_s: float
    pos_per_seq: float
    params_trainable: int
    threads: int
    load: str


def time_steps(cfg: DictConfig, name: str, image: str, steps: int, warmup: int) -> tuple[Throughput, Throughput]:
    """Warm-up, then ``steps`` plain training steps; the same work as Lightning's automatic optimisation.

    Returns:
        The step row, and the floor row: the same steps on batches drawn beforehand (see the module
        docstring), timed right after on the same model.
    """
    dm, model, _ = build(cfg)
    gpu = cfg.trainer.accelerator in ("gpu", "cuda")
    device = torch.device("cuda" if gpu else "cpu")
    deterministic = cfg.trainer.get("deterministic")  # as lightning.Trainer applies it
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=deterministic == "warn")
    model.to(device)
    model.attach_features(dm.item_features)  # features follow the model's device
    model.setup("fit")  # (no trainer: only the module's own torch settings)
    model.log = lambda *args, **kwargs: None  # no trainer attached: logging is a no-op here
    model.train()
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.trainer.get("gradient_clip_val")
    precision = str(cfg.trainer.get("precision", "32-true"))
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision.startswith("bf16")
        else contextlib.nullcontext()
    )

    loader = dm.train_dataloader()

    def batches():
        epoch = 0
        while True:
            if hasattr(loader.sampler, "set_epoch"):  # a new shuffle each pass, as Lightning does
                loader.sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    it = batches()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(i: int, prebuilt: dict | None = None) -> tuple[float, int, int]:
        t = time.perf_counter()
        if prebuilt is None:  # on the host, then to the device, as Lightning does it
            prebuilt = {k: v.to(device, non_blocking=True) for k, v in model.on_before_batch_transfer(next(it), 0).items()}
        batch = prebuilt
        data = time.perf_counter() - t
        with autocast:
            loss = model.training_step(batch, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return data, len(batch["targets"]), int((batch["targets"] != 0).sum())

    sync()
    t = time.perf_counter()
    step(0)  # a frozen image encoder builds its feature cache here
    sync()
    first = time.perf_counter() - t
    for i in range(1, warmup):
        step(i)
    sync()
    data_s = 0.0
    seqs = pos = 0
    t = time.perf_counter()
    for i in range(steps):
        d, s, p = step(warmup + i)
        data_s += d
        seqs += s
        pos += p
    sync()
    wall = time.perf_counter() - t
    row = Throughput(
        config=name,
        image=image,
        steps=steps,
        batch_size=cfg.datamodule.batch_size,
        windows=len(dm.train_data),
        step_s=wall / steps,
        data_s=data_s / steps,
        first_step_s=first,
        seqs_per_s=seqs / wall,
        pos_per_s=pos / wall,
        pos_per_seq=pos / max(seqs, 1),
        params_trainable=sum(p.numel() for p in params),
        threads=torch.get_num_threads(),
        load=load(),
    )
    prebuilt = [{k: v.to(device) for k, v in model.on_before_batch_transfer(next(it), 0).items()} for _ in range(steps)]
    sync()
    seqs = pos = 0
    t = time.perf_counter()
    for i, batch in enumerate(prebuilt):
        _, s, p = step(warmup + steps + i, batch)
        seqs += s
        pos += p
    sync()
    wall = time.perf_counter() - t
    floor = dataclasses.replace(
        row, image=f"{image}, floor", step_s=wall / steps, data_s=0.0, first_step_s=float("nan"),
        seqs_per_s=seqs / wall, pos_per_s=pos / wall, pos_per_seq=pos / max(seqs, 1), load=load(),
    )
    return row, floor


class EpochTimer(L.Callback):
    """Timestamps around the training batches and the validation pass of each epoch.

    Training time runs from the epoch start to the end of its last batch (optimiser step included);
    validation time from the start to the end of the validation loop that follows.
    """

    def __init__(self) -> None:
        self.train_s = self.val_s = 0.0
        self.train_batches = self.val_batches = 0
        self.embed_s = 0.0  # validation start -> first validation batch: the catalog's item embeddings
        self._epoch_t = self._last_batch_t = self._val_t = 0.0
        self._first_val_batch = False

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_t = self._last_batch_t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_batch_t = time.perf_counter()
        self.train_batches += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.train_s += self._last_batch_t - self._epoch_t

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_t = time.perf_counter()
        self._first_val_batch = True

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self._first_val_batch:  # the module's on_validation_epoch_start (embed_all) has just run
            self.embed_s += time.perf_counter() - self._val_t
            self._first_val_batch = False

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.val_batches += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        self.val_s += time.perf_counter() - self._val_t


def time_epoch(cfg: DictConfig, name: str, image: str) -> dict:
    """One ``trainer.fit`` epoch (train + validation), split by :class:`EpochTimer`."""
    dm, model, _ = build(cfg)
    timer = EpochTimer()
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[timer], logger=False)
    t = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - t
    total = timer.train_s + timer.val_s
    return {
        "config": name,
        "image": image,
        "train_batches": timer.train_batches,
        "val_batches": timer.val_batches,
        "val_users": len(dm.val_split),
        "train_s": timer.train_s,
        "val_s": timer.val_s,
        "embed_s": timer.embed_s,
        "threads": torch.get_num_threads(),
        "val_frac": timer.val_s / total if total else float("nan"),
        "fit_s": fit_s,
        "load": load(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per row")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed steps before (the first is also shown alone)"
    )
    p.add_argument(
        "--configs", default="synthetic,hm_fusion", help=f"comma-separated, of {sorted(CONFIG_OVERRIDES)}"
    )
    p.add_argument("--images", default="trainable,frozen", help="image-encoder modes: trainable,frozen")
    p.add_argument("--overrides", nargs="*", default=[], help="extra train-config overrides for every run")
    p.add_argument("--epoch-configs", default="hm_fusion", help="configs timed for one full epoch")
    p.add_argument("--epoch-images", default="trainable", help="image-encoder modes for the epoch runs")
    p.add_argument("--skip-epoch", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument(
        "--processed-root", default=None, help="parent of the processed folders (default: data/processed)"
    )
    p.add_argument(
        "--threads",
        default="",
        help="comma-separated torch intra-op thread counts for the throughput rows; the epoch uses the first "
        "(default: torch's choice)",
    )
    args = p.parse_args()

    logging.getLogger("lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning's own, not ours
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    configs = [c for c in args.configs.split(",") if c]
    images = [m for m in args.images.split(",") if m]
    threads = [int(t) for t in args.threads.split(",") if t] or [torch.get_num_threads()]
    out = Path(tempfile.mkdtemp(prefix="towerrec_bench_train_"))
    print(
        f"# towerrec training benchmark\n\nCPUs: {os.cpu_count()}, torch {torch.__version__} "
        f"(default {torch.get_num_threads()} intra-op threads), CUDA {'yes' if torch.cuda.is_available() else 'no'}; "
        f"extra overrides: {args.overrides or 'none'}; load average at start: {load()}"
    )

    if not args.skip_throughput:
        rows: list[Throughput] = []
        for name in configs:
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                for mode in images:
                    overrides = [*CONFIG_OVERRIDES[name], *args.overrides] + (
                        [FROZEN] if mode == "frozen" else []
                    )
                    cfg = compose_train(overrides, out / f"{name}_{mode}", args.processed_root)
                    if not has_image_encoder(cfg) and mode == "frozen":
                        continue
                    label = mode if has_image_encoder(cfg) else "none"
                    rows.extend(time_steps(cfg, name, label, args.steps, args.warmup))
        print(
            f"\n## Training throughput ({args.steps} timed steps after {args.warmup} warm-up steps, plain loop)\n"
        )
        print(
            "| config | image encoder | threads | batch | windows | trainable params | first step s | s/step "
            "| data s/step | sequences/s | positions/s | positions/seq | load avg |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in rows:
            print(
                f"| {r.config} | {r.image} | {r.threads} | {r.batch_size} | {r.windows:,} | {r.params_trainable:,} | "
                f"{r.first_step_s:.2f} | {r.step_s:.3f} | {r.data_s:.4f} | {r.seqs_per_s:,.1f} | "
                f"{r.pos_per_s:,.0f} | {r.pos_per_seq:.1f} | {r.load} |"
            )
        print()
        for r in rows:
            floor = next((f for f in rows if f.image == f"{r.image}, floor" and (f.config, f.threads) == (r.config, r.threads)), None)
            if floor is not None:
                print(f"- {r.config}, {r.image}, {r.threads} thread(s): step / floor = x{r.step_s / floor.step_s:.2f}")
        for name in configs:
            for n_threads in threads:
                by = {r.image: r for r in rows if r.config == name and r.threads == n_threads}
                if "trainable" in by and "frozen" in by:
                    ratio = by["frozen"].pos_per_s / by["trainable"].pos_per_s
                    print(f"- {name}, {n_threads} thread(s): frozen / trainable positions/s = x{ratio:.2f}")
            for mode in images:
                by_t = {r.threads: r for r in rows if r.config == name and r.image == mode}
                if len(by_t) > 1:
                    base = by_t[threads[0]]
                    others = ", ".join(
                        f"{t} threads x{r.pos_per_s / base.pos_per_s:.2f}"
                        for t, r in by_t.items()
                        if t != threads[0]
                    )
                    print(f"- {name}, {mode}: positions/s relative to {threads[0]} thread(s): {others}")

    if not args.skip_epoch:
        torch.set_num_threads(threads[0])
        epoch_rows = []
        for name in [c for c in args.epoch_configs.split(",") if c]:
            for mode in [m for m in args.epoch_images.split(",") if m]:
                overrides = [*CONFIG_OVERRIDES[name], *args.overrides, *EPOCH_OVERRIDES]
                overrides += [FROZEN] if mode == "frozen" else []
                cfg = compose_train(overrides, out / f"epoch_{name}_{mode}", args.processed_root)
                if not has_image_encoder(cfg) and mode == "frozen":
                    continue
                epoch_rows.append(time_epoch(cfg, name, mode if has_image_encoder(cfg) else "none"))
        print("\n## One full epoch through `lightning.Trainer` (train + validation)\n")
        print(
            "| config | image encoder | threads | train batches | val batches (users) | train s | validation s "
            "| of which item embeddings s | validation share | fit() wall s | load avg |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in epoch_rows:
            print(
                f"| {r['config']} | {r['image']} | {r['threads']} | {r['train_batches']} | "
                f"{r['val_batches']} ({r['val_users']:,}) | {r['train_s']:.1f} | {r['val_s']:.1f} | "
                f"{r['embed_s']:.1f} | {100 * r['val_frac']:.1f}% | {r['fit_s']:.1f} | {r['load']} |"
            )
    print(f"\nload average at end: {load()}")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
