"""The LightningModule: loss, metrics and optimisers around injected item and user towers."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from towerrec.models.components.dropout import set_dropout_mask
from towerrec.models.components.item_tower import ItemTower
from towerrec.models.components.loss import SampledSoftmaxLoss
from towerrec.ranking import aggregate, chunk_rows, rank_metrics, score_topk, seen_pairs

#: History widths of the groups :meth:`TwoTowerModule.user_embeddings` embeds together, in steps of this.
WIDTH_STEP = 8


class TwoTowerModule(L.LightningModule):
    """Two-tower retrieval: user tower over item-tower embeddings of the history.

    Args:
        item_tower: item index -> unit-norm embedding.
        user_tower: a sequence encoder ``(B, L, D), padding (B, L) -> (B, L, D)``.
        loss: the sampled softmax loss.
        optimizer: a partial optimiser, called with the parameters.
        scheduler: a partial LR scheduler, called with the optimiser, or None.
        ks: cut-offs reported at validation and test.
        monitor_k: the k of ``val/ndcg@k``, the checkpoint-selection metric.
        dim: the embedding size (recorded with the hyperparameters).
        meta: the data sizes the components were built for (recorded with the hyperparameters).
        id_dropout_side: ``"both"`` drops an item's ID for its history and candidate uses alike (one
            draw per batch); ``"candidates"`` keeps history IDs and drops only on the scored side.
        dropout_mask: ``"torch"`` or ``"bits"``, the mask of every dropout in the towers on the CPU
            (:mod:`towerrec.models.components.dropout`: ``bits`` is cheaper, and draws other masks).

    A module built by :meth:`from_config` records its resolved config in ``hparams["config"]``;
    Lightning saves it with every checkpoint, so a checkpoint of ``towerrec-train`` or of any
    ``Trainer.fit`` rebuilds the module (:mod:`towerrec.models.checkpoint`).
    """

    def __init__(
        self,
        item_tower: ItemTower,
        user_tower: nn.Module,
        loss: SampledSoftmaxLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        ks: list[int] = (10, 20),
        monitor_k: int = 20,
        dim: int | None = None,
        meta: dict | None = None,
        id_dropout_side: str = "both",
        dropout_mask: str = "torch",
    ) -> None:
        super().__init__()
        if id_dropout_side not in ("both", "candidates"):
            raise ValueError(f"id_dropout_side must be 'both' or 'candidates', got {id_dropout_side!r}")
        self.id_dropout_side = id_dropout_side
        if isinstance(meta, DictConfig):
            meta = OmegaConf.to_container(meta, resolve=True)
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {"ks": list(ks), "monitor_k": monitor_k, "dim": dim, "meta": meta}, logger=False
        )
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.item_tower = item_tower
        self.user_tower = user_tower
        set_dropout_mask(self, dropout_mask)
        self.loss_fn = loss
        self.ks = sorted(int(k) for k in ks)
        self.monitor_k = monitor_k
        self.register_buffer("item_freq", None, persistent=False)
        self._eval_emb: Tensor | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig | dict) -> TwoTowerModule:
        """Build the module from a model config (``configs/model/two_tower.yaml`` and overrides, with
        ``meta`` filled in from the data) and record the resolved config in its hyperparameters.

        Args:
            cfg: the model config, with ``_target_``: a node of the run config (its interpolations
                are resolved there) or an already resolved dict, such as a checkpoint holds.
        """
        resolved = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        module = instantiate(resolved)
        module.hparams["config"] = resolved  # saved with every checkpoint (Lightning stores hparams)
        return module

    # ------------------------------------------------------------------ features
    def attach_features(self, features) -> None:
        """Give the towers the catalog's per-item tensors (from the DataModule)."""
        self.item_tower.attach_features(features)
        count = features.train_count.float()
        self.item_freq = (count / count.sum().clamp(min=1)).to(self.item_tower.fusion_device)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and self.item_tower.is_cold is None:
            self.attach_features(dm.model_features)
        if torch.are_deterministic_algorithms_enabled():
            # Deterministic mode also fills every new tensor with NaN, a check for reads of memory never
            # written, which no op here makes: hundreds of fills a step, 5 to 7% of a quick-start step's
            # CPU time at one thread. The algorithms stay the deterministic ones.
            torch.utils.deterministic.fill_uninitialized_memory = False

    # ------------------------------------------------------------------ forward
    def queries(self, hist_emb: Tensor, pad: Tensor, last_only: bool = False) -> Tensor:
        """Causal unit-norm queries at every position: ``(B, L, D')`` history item vectors ->
        ``(B, L, D')``, where ``D'`` is the item tower's ``out_dim`` (``(B, 1, D')``, the last
        position only, with ``last_only``).

        The user tower reads the learned part of the item vectors. With a content sketch, the query
        is ``[user tower output, weighted mean sketch of the recent items]``, normalised.
        """
        tower = self.item_tower
        x = tower.learned_part(hist_emb)
        if last_only and getattr(self.user_tower, "last_only", False):
            h = self.user_tower(x, pad, last_only=True)  # (B, 1, D): only the last position computed
        else:
            h = self.user_tower(x, pad)  # (B, L, D), causal
            h = h[:, -1:] if last_only else h
        h = F.normalize(h, dim=-1)
        if tower.sketch is None:
            return h
        s = tower.sketch.user(tower.sketch_part(hist_emb), pad)[:, -h.shape[1] :]  # (the transformer keeps max_len)
        return F.normalize(torch.cat([h, s], dim=-1), dim=-1)

    def user_embeddings(self, history: Tensor, item_emb: Tensor | None = None) -> Tensor:
        """``(B, L)`` left-padded histories -> ``(B, D')`` unit-norm user embeddings.

        With a user tower that ignores padding (``trims_padding``: the causal transformer, mean
        pooling), users are embedded in groups of about equal history length, with the padding in
        front of the group's longest history cut off: most histories are far shorter than ``L``,
        and the user tower's cost grows with the width. Only the last position is computed where the
        tower can skip the others (``last_only``). A user's width depends only on its own history,
        whichever other users share the call (the validation batch, an evaluation chunk, one served
        request).
        """
        if not getattr(self.user_tower, "trims_padding", False) or history.shape[0] == 0:
            return self._user_embeddings(history, item_emb)
        length = history_lengths(history)
        # Widths in steps of WIDTH_STEP: a few groups per call, each large enough to keep the matrix
        # products efficient (one group per length made calls of a few users, slower than no cut).
        width = ((length + WIDTH_STEP - 1) // WIDTH_STEP * WIDTH_STEP).clamp(max=history.shape[1])
        order = torch.argsort(width, stable=True)
        widths, counts = torch.unique_consecutive(width[order], return_counts=True)
        if len(widths) == 1:
            return self._user_embeddings(history[:, -int(widths[0]) :], item_emb)
        out = None
        for rows, w in zip(order.split(counts.tolist()), widths.tolist(), strict=True):
            emb = self._user_embeddings(history[rows, -w:], item_emb)
            if out is None:
                out = emb.new_empty(history.shape[0], emb.shape[1])
            out[rows] = emb
        return out

    def _user_embeddings(self, history: Tensor, item_emb: Tensor | None = None) -> Tensor:
        pad = history == 0
        # A user with no history still gets a query: the last slot (padding, a zero vector) is unmasked.
        pad[:, -1] = False
        h = item_emb[history] if item_emb is not None else self.item_tower(history)  # (B, L, D')
        return self.queries(h, pad, last_only=True)[:, -1]  # (B, D')

    def on_before_batch_transfer(self, batch: dict[str, Tensor], dataloader_idx: int) -> dict[str, Tensor]:
        """Training batches get their distinct items here, on the host, before they reach the device.

        The step then works with fixed shapes and no host sync on an accelerator (``torch.unique``
        and boolean masks wait for the device there). With uniform negatives, which are drawn in
        the step, the step finds them itself.
        """
        if "inputs" in batch and "items" not in batch and not self.loss_fn.num_uniform_negatives:
            batch = {**batch, **batch_candidates(batch["inputs"], batch["targets"])}
        return batch

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch["inputs"], batch["targets"]  # (B, L) each
        n_items = len(self.item_tower.is_cold) - 1
        m = self.loss_fn.num_uniform_negatives
        if "items" not in batch or m:
            negatives = torch.randint(1, n_items + 1, (m,), device=inputs.device) if m else None
            batch = {**batch, **batch_candidates(inputs, targets, negatives)}
        uniq, inv, supervised = batch["items"], batch["inverse"], batch["supervised"]  # (C,), (2BL [+M],), (P,)
        # Each distinct item of the batch (history, positive or negative) goes through the item tower
        # once, then is gathered into its places. "candidates": histories keep their IDs (as at serving
        # time, when they are mostly warm) and only the scored side is dropped, DropoutNet-style; the
        # two views share the image and content parts.
        if self.id_dropout_side == "candidates":
            emb, hist_emb = self.item_tower.forward_views(uniq, (True, False))  # (C, D') each
        else:
            emb = hist_emb = self.item_tower(uniq)  # (C, D'), with ID dropout
        n = inputs.numel()
        hist = hist_emb[inv[:n]].view(*inputs.shape, -1)  # (B, L, D')
        h = self.queries(hist, inputs == 0)  # (B, L, D')
        query = h.reshape(-1, h.shape[-1]).index_select(0, supervised)  # (P, D')
        positive = inv[n : 2 * n].index_select(0, supervised)  # (P,)
        log_q = self.loss_fn.candidate_log_q(self.item_freq[uniq], len(positive), n_items)
        loss = self.loss_fn(query, emb, positive, uniq, log_q)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(positive))
        return loss

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def rank(
        self,
        history: Tensor,
        k: int,
        seen: Tensor | None = None,
        item_emb: Tensor | None = None,
        chunk_size: int = 1024,
        score_rows: int | None = None,
    ) -> Tensor:
        """Top-k items over the whole catalogue for ``(U, L)`` left-padded histories: the one ranking path.

        Validation, testing, ``towerrec-eval`` and the export's recall check all rank through here.
        Scores are dot products of unit-norm vectors; ties follow the fixed random item order
        (:func:`~towerrec.ranking.tie_order`); padding is never recommended.

        Args:
            history: item indices, most recent last.
            k: items per user.
            seen: ``(U, S)`` right-padded items masked per user (already bought), or None.
            item_emb: ``(N+1, D')`` item vectors, when the caller has them (eval mode, no ID dropout).
            chunk_size: users embedded at once.
            score_rows: users scored at once; ``None`` sizes the chunks from a memory budget
                (:func:`~towerrec.ranking.chunk_rows`).

        Returns:
            ``(U, k)`` long item indices, best first, on the device of the item vectors.
        """
        item_emb = self.item_tower.embed_all() if item_emb is None else item_emb
        device = item_emb.device
        if len(history) == 0:
            return torch.empty(0, k, dtype=torch.long, device=device)
        users = torch.cat(
            [
                self.user_embeddings(history[i : i + chunk_size].to(device), item_emb)
                for i in range(0, len(history), chunk_size)
            ]
        )  # (U, D')
        return score_topk(users, item_emb, k, seen=seen_pairs(seen), chunk_size=score_rows)

    @torch.no_grad()
    def rank_split(self, split, k: int, chunk_users: int = 65536, chunk_size: int = 1024) -> Tensor:
        """Top-k items for every user of an evaluation split, about ``chunk_users`` users at a time.

        Each chunk's histories (and seen items) are cut from the split's memory-mapped sequences and
        ranked by :meth:`rank`; only the ``(U, k)`` result grows with the users. Users are embedded and
        scored in groups of ``chunk_size`` rows (fewer when one group's scores would pass
        :func:`~towerrec.ranking.chunk_rows`' budget) counted from the split's first user, and chunks are
        whole groups, so every matrix product sees the same rows whatever ``chunk_users`` is: the
        result does not depend on it, to the bit.

        Args:
            split: an :class:`~towerrec.data.datamodule.EvalSplit` (its ``history`` and ``seen`` rows).
            k: items per user.
            chunk_users: users cut and ranked at once (rounded up to whole groups).
            chunk_size: users embedded and scored at once.

        Returns:
            ``(U, k)`` long item indices on the CPU, best first.
        """
        item_emb = self.item_tower.embed_all()
        group = max(1, min(chunk_size, chunk_rows(item_emb.shape[0])))
        step = -(-max(chunk_users, 1) // group) * group
        parts = [
            self.rank(split.history[i : i + step], k, seen=None if split.seen is None else split.seen[i : i + step],
                      item_emb=item_emb, chunk_size=group, score_rows=group).cpu()
            for i in range(0, len(split), step)
        ]
        return torch.cat(parts) if parts else torch.empty(0, k, dtype=torch.long)

    def _eval_metrics(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        topk = self.rank(batch["history"], max(self.ks), seen=batch.get("seen"), item_emb=self._eval_emb)
        return rank_metrics(topk, batch["targets"], self.ks)

    def on_validation_epoch_start(self) -> None:
        self._eval_emb = self.item_tower.embed_all()  # (N+1, D), eval mode: no ID dropout

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        for name, value in aggregate(self._eval_metrics(batch)).items():
            if name != "users":
                self.log(f"val/{name}", value, batch_size=len(batch["targets"]), sync_dist=True)

    # ------------------------------------------------------------------ optimisers
    def configure_optimizers(self):
        opt = self.optimizer(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler is None:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": self.scheduler(optimizer=opt), "interval": "step"},
        }


def history_lengths(history: Tensor) -> Tensor:
    """``(B,)`` slots from each left-padded history's first real item to its end (1 for no history:
    the user still gets a query from the last slot)."""
    real = history != 0
    first = real.to(torch.int8).argmax(dim=1)  # the first real item
    return torch.where(real.any(dim=1), history.shape[1] - first, 1)


def batch_candidates(inputs: Tensor, targets: Tensor, negatives: Tensor | None = None) -> dict[str, Tensor]:
    """The distinct items of a training batch and where each position finds its own.

    Args:
        inputs: ``(B, L)`` history items, 0-padded.
        targets: ``(B, L)`` next items, 0 where there is none.
        negatives: ``(M,)`` extra candidate items (uniform negatives), or None.

    Returns:
        ``items``: ``(C,)`` sorted distinct ids of inputs, targets and negatives; ``inverse``:
        ``(2BL [+ M],)`` the column in ``items`` of each input, then each target (then each negative);
        ``supervised``: ``(P,)`` the flat positions whose target is an item.
    """
    pieces = [inputs.reshape(-1), targets.reshape(-1)] + ([negatives] if negatives is not None else [])
    items, inverse = torch.unique(torch.cat(pieces), return_inverse=True)
    supervised = (targets.reshape(-1) != 0).nonzero().squeeze(1)
    return {"items": items, "inverse": inverse, "supervised": supervised}
