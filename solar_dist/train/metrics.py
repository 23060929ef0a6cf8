"""Ranking-quality metrics for evaluation, computed by torchrec.metrics (AUC, GAUC, NE) plus log-loss.

torchrec's metric modules keep their state as tensors and reduce it over the process group, so the same
code gives the global figure on one process or on many. GAUC is per-request ("session") AUC averaged over
requests that have both classes, which is what "does the model rank this user's candidates" means.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.gauc import GAUCMetricComputation
from torchrec.metrics.metrics_config import RecComputeMode, RecTaskInfo
from torchrec.metrics.ne import NEMetric

TASK = "click"


class EvalMetrics:
    """Accumulates (logits, labels, candidates-per-request) batches; `compute()` returns plain floats."""

    def __init__(
        self,
        names: Iterable[str] = ("auc", "gauc", "ne", "logloss"),
        *,
        batch_size: int = 1,
        process_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        self.names = list(names)
        world = dist.get_world_size(process_group) if dist.is_initialized() else 1
        rank = dist.get_rank(process_group) if dist.is_initialized() else 0
        task = RecTaskInfo(name=TASK, label_name="label", prediction_name="prediction", weight_name="weight")
        common = dict(
            world_size=world, my_rank=rank, batch_size=batch_size, tasks=[task],
            compute_mode=RecComputeMode.UNFUSED_TASKS_COMPUTATION, window_size=10**9,
            compute_on_all_ranks=True, process_group=process_group,
        )
        self._metrics = {}
        if "auc" in self.names:
            self._metrics["auc"] = AUCMetric(**common)
        # GAUC: torchrec 1.8's GAUCMetric wrapper reshapes `num_candidates` like the labels, which its own
        # computation cannot consume; its computation class is used directly (state reduced the same way).
        self._gauc = None
        if "gauc" in self.names:
            self._gauc = GAUCMetricComputation(
                my_rank=rank, batch_size=batch_size, n_tasks=1, window_size=10**9,
                compute_on_all_ranks=True, process_group=process_group,
            )
        if "ne" in self.names or "logloss" in self.names:
            self._metrics["ne"] = NEMetric(**common)
        self._bce_sum = torch.zeros((), dtype=torch.float64)
        self._count = torch.zeros((), dtype=torch.float64)
        self._pg = process_group

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, num_candidates: torch.Tensor) -> None:
        logits = logits.detach().float().cpu()
        labels = labels.detach().float().cpu()
        preds = torch.sigmoid(logits)
        weights = torch.ones_like(preds)
        for metric in self._metrics.values():
            metric.update(predictions={TASK: preds}, labels={TASK: labels}, weights={TASK: weights})
        if self._gauc is not None:
            lengths = num_candidates.detach().cpu().long()
            if int(lengths.sum()) != preds.numel():
                raise ValueError(f"num_candidates sums to {int(lengths.sum())}, but there are {preds.numel()} logits")
            self._gauc.update(predictions=preds[None], labels=labels[None], weights=weights[None],
                              num_candidates=lengths)
        self._bce_sum += torch.nn.functional.binary_cross_entropy_with_logits(
            logits.double(), labels.double(), reduction="sum"
        )
        self._count += labels.numel()

    def compute(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for name, metric in self._metrics.items():
            values = metric.compute()
            # keys look like "auc-click|lifetime_auc"; torchrec's AUC keeps only a window, which is set
            # larger than any evaluation (window_size=1e9), so its window figure is the lifetime figure.
            for key, value in sorted(values.items(), key=lambda kv: "lifetime" in kv[0]):
                short = key.split("|")[-1].replace("lifetime_", "").replace("window_", "")
                if short in ("auc", "ne"):
                    out[short] = float(value)
        if self._gauc is not None:
            for report in self._gauc.compute():
                if report.metric_prefix.value == "lifetime_" and report.name.value == "gauc":
                    out["gauc"] = float(report.value)
        if "logloss" in self.names:
            total = torch.stack([self._bce_sum, self._count])
            if dist.is_initialized():
                dist.all_reduce(total, group=self._pg)
            out["logloss"] = float(total[0] / total[1].clamp_min(1))
        return {k: out[k] for k in self.names if k in out}
