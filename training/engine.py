"""The one training loop every method shares (single process, or DDP under torchrun).

Per step: a batch of indices from a seeded per-epoch permutation (sharded by rank like
DistributedSampler, drop_last) -> uint8 images on the device -> the method's augmentation (one
call per view) -> `Method.forward(views, indices)` -> backward -> optional AGC -> optimiser
step -> per-step lr schedule -> `method.on_step_end(progress)`.

Around the loop, each in a module of its own: optimiser and lr schedule (training/schedule.py, with
the schedule fitted to `--time-budget`), stopping on a signal or the budget (training/stopping.py),
precision (training/precision.py) and the training plot (training/plotting.py).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from tqdm import tqdm

from training import distributed as dist
from training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    TrainState,
    capture_rng_states,
    check_resumable,
    load_checkpoint,
    resolve_resume,
    restore_rng_states,
    save_checkpoint,
    save_json,
)
from training.config import RunConfig
from training.data.datasets import ImageDataset, epoch_indices
from training.data.images import resize_center_crop
from training.encoder import embedding_features, make_encoder_record, save_encoder
from training.errors import TrainingError
from training.knn_monitor import KnnMonitor
from training.methods.base import Method
from training.models import EmbeddingNetwork
from training.models.whitening import Whitening, fit_sample_count
from training.optim.agc import adaptive_gradient_clip_
from training.plotting import plot_history
from training.precision import autocast_dtype, resolve_amp
from training.schedule import StepSchedule, build_optimizer, scaled_lr
from training.stopping import StopRequested, TimeBudget

Augmentation = Callable[[torch.Tensor, int], torch.Tensor]


class Trainer:
    """Holds the run's pieces; `fit()` trains to the end (or to `--max-steps`, or a signal)."""

    def __init__(
        self,
        config: RunConfig,
        method: Method,
        augment: Augmentation,
        dataset: ImageDataset,
        mean: list[float],
        std: list[float],
        encoder_spec: dict[str, Any],
        knn: KnnMonitor | None = None,
        device: torch.device | None = None,
        local_augment: Augmentation | None = None,
    ) -> None:
        self.config = config
        self.device = device or torch.device("cpu")
        self.dataset = dataset
        self.augment = augment
        # Multi-crop: --local-crops views per image at the local size, after the method's own views.
        if config.local_crops and (local_augment is None or not method.accepts_local_crops):
            raise TrainingError(f"--local-crops {config.local_crops}: {method.name} takes no local views")
        self.local_augment = local_augment if config.local_crops else None
        self.mean, self.std = list(mean), list(std)
        self.encoder_spec = dict(encoder_spec)
        if config.embedding_grid != 1:
            self.encoder_spec["grid"] = config.embedding_grid
        if config.embedding_scales != (1.0,):
            self.encoder_spec["scales"] = list(config.embedding_scales)
        self.knn = knn
        self.out = Path(config.out)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_batch = config.batch_size // self.world  # divisible: RunConfig checked it
        self.steps_per_epoch = len(dataset) // self.world // self.local_batch
        if self.steps_per_epoch == 0:
            raise TrainingError(
                f"{len(dataset)} images make no full batch of {config.batch_size}; lower --batch-size"
            )
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.amp == "fp16" and self.device.type != "cuda":
            raise TrainingError("--amp fp16 needs a CUDA device (GradScaler); use --amp bf16 on CPU")
        self.amp_dtype = autocast_dtype(config.amp, self.device)
        self.channels_last = config.channels_last and config.is_convolutional

        if method.sync_batch_norm and dist.is_distributed():
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        self.method = method.to(self.device)
        if self.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        self.model: nn.Module = self.method
        if dist.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(
                self.method, device_ids=ids, **self._buffer_sync()
            )
        self.forward = torch.compile(self.model) if config.compile else self.model

        self.peak_lr = scaled_lr(config.lr, config.batch_size)
        self.optimizer = build_optimizer(config, self.method, self.peak_lr)
        warmup = round(config.warmup_epochs * self.steps_per_epoch)
        decay_at = [round(e * self.steps_per_epoch) for e in config.lr_steps]
        self.schedule = StepSchedule(self.total_steps, warmup, config.lr_schedule, decay_at)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule.factor)
        self.budget: TimeBudget | None = None
        self._steps_this_process = 0
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.amp == "fp16")
        self.agc_skip = self._agc_skip()
        self.state = TrainState()
        self._saved_at_step = -1
        # Keep a small data set on the device: sampling is then a gather, with no host copy per step.
        self.images = dataset.images
        if self.device.type == "cuda" and dataset.images.numel() <= config.device_data_max_mb * 2**20:
            self.images = dataset.images.to(self.device)
        self.log = self._make_logger()

    # -- pieces ---------------------------------------------------------------------------------

    def _agc_skip(self) -> list[str]:
        """AGC clips every layer but the final one (Brock et al. 2021): here the last trainable Linear
        (the query branch's last projection/prediction layer; a momentum copy has no gradient)."""
        last = None
        for name, module in self.method.named_modules():
            if isinstance(module, nn.Linear) and module.weight.requires_grad:
                last = name
        if last is None:
            return []
        return [f"{last}.{name}" for name, _ in self.method.get_submodule(last).named_parameters()]

    def _buffer_sync(self) -> dict[str, bool]:
        """DDP's per-forward buffer broadcast from rank 0, as the method asks (InstDisc's bank: off).
        Newer torch renames the flag; both still sync buffers once at construction."""
        sync = bool(self.method.ddp_broadcast_buffers)
        parameters = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        return {"forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers": sync}

    def _make_logger(self):
        if not dist.is_main_process() or not self.config.tensorboard:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out / "tb"))

    def embedding_network(self) -> EmbeddingNetwork:
        """The retrieval embedding before whitening: the method's, pooled to `--embedding-grid` at
        `--embedding-scales`."""
        network = self.method.embedding_network()
        if self.config.embedding_grid == 1 and self.config.embedding_scales == (1.0,):
            return network
        return EmbeddingNetwork(
            network.backbone, network.head, self.config.embedding_grid, scales=self.config.embedding_scales
        )

    # -- checkpoints ----------------------------------------------------------------------------

    def whitened_network(self) -> nn.Module:
        """The retrieval embedding with `--whitening pca` fitted on (a seeded sample of, the same at
        every save: `fit_sample_count`) the training images' embeddings, no labels."""
        network = self.embedding_network()
        if self.config.whitening == "none":
            return network
        generator = torch.Generator().manual_seed(self.config.seed)
        chosen = torch.randperm(len(self.dataset), generator=generator)[: fit_sample_count(network.out_dim)]
        images = resize_center_crop(self.images[chosen.to(self.images.device)], self.embedding_size)
        features = embedding_features(network, images, self.mean, self.std, self.device, self.amp_dtype)
        whitening = Whitening.fitted(features, self.config.whiten_power).to(self.device)
        return EmbeddingNetwork(network.backbone, network.head, network.grid, whitening, network.scales)

    def encoder_record(self, metrics: dict[str, Any]) -> dict[str, Any]:
        network = self.whitened_network()
        spec = dict(self.encoder_spec)
        if network.whitening is not None:
            spec["whitening"] = network.whitening.spec
        return make_encoder_record(
            method=self.method.name,
            network_spec=spec,
            network=network,
            embed_dim=network.out_dim,
            input_size=self.embedding_size,
            in_channels=self.dataset.in_channels,
            mean=self.mean,
            std=self.std,
            metrics=metrics,
            train_size=self.config.crop_size,
        )

    @property
    def embedding_size(self) -> int:
        return self.config.embedding_side

    def summary_metrics(self) -> dict[str, Any]:
        last = self.state.history[-1] if self.state.history else {}
        metrics = {k: v for k, v in last.items() if k.startswith("knn/") or k == "loss"}
        metrics.update(epochs=self.state.epoch, steps=self.state.global_step, data=self.config.data)
        return metrics

    def checkpoint_state(self) -> dict[str, Any]:
        rng = capture_rng_states()
        all_rng = [None] * self.world
        if dist.is_distributed():
            torch_dist.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": all_rng,
            "epoch": self.state.epoch,
            "step_in_epoch": self.state.step_in_epoch,
            "global_step": self.state.global_step,
            "history": self.state.history,
            "loss_curve": self.state.loss_curve,
            "config": self.config.to_dict(),
            "world_size": self.world,
            "encoder": self.encoder_record(self.summary_metrics()),
        }

    def save(self) -> None:
        """Every rank joins (RNG gather); rank 0 writes checkpoint.pt, encoder.pt and metrics.json."""
        state = self.checkpoint_state()
        self._saved_at_step = self.state.global_step
        if dist.is_main_process():
            save_checkpoint(self.out / CHECKPOINT_NAME, state)
            save_encoder(self.out / "encoder.pt", state["encoder"])
            save_json(
                self.out / "metrics.json", {"history": self.state.history, "final": self.summary_metrics()}
            )
        dist.barrier()

    def resume(self, path: Path) -> None:
        saved = load_checkpoint(path)
        check_resumable(saved, path, self.config.to_dict(), self.world)
        self.method.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.schedule.load_state_dict(saved.get("schedule", {}))
        self.scaler.load_state_dict(saved["scaler"])
        restore_rng_states(saved["rng"][self.rank])
        self.state = TrainState.from_checkpoint(saved)
        self.print(f"resumed from {path} at epoch {self.state.epoch} step {self.state.step_in_epoch}")

    # -- the loop -------------------------------------------------------------------------------

    def print(self, message: str) -> None:
        if dist.is_main_process():
            tqdm.write(message)

    def views(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """The method's views of the data-set images at `indices` (B): float BxCxSxS each, view v
        made from the images `method.view_sources` names for it (the images themselves but for
        mined-neighbour positives), then the local BxCxLxL of the images themselves."""
        batches: dict[int, torch.Tensor] = {}  # one gather per distinct source tensor

        def images_at(source: torch.Tensor) -> torch.Tensor:  # uint8 BxCxSxS on the device
            if id(source) not in batches:
                batches[id(source)] = self.images[source.to(self.images.device)].to(
                    self.device, non_blocking=True
                )
            return batches[id(source)]

        sources = self.method.view_sources(indices)
        views = [self.augment(images_at(source), v) for v, source in enumerate(sources)]
        if self.local_augment is not None:
            views += [self.local_augment(images_at(indices), v) for v in range(self.config.local_crops)]
        return views

    def train_step(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        views = self.views(indices)
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            output = self.forward(views, indices.to(self.device, non_blocking=True))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(output.loss).backward()
        if self.config.agc_clip:
            self.scaler.unscale_(self.optimizer)
            adaptive_gradient_clip_(self.method, self.config.agc_clip, skip=self.agc_skip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.state.global_step += 1
        self.method.on_step_end(self.schedule.progress(self.state.global_step))
        return output.loss.detach(), output.metrics

    def fit(self) -> dict[str, Any]:
        """Train; returns the summary metrics. Saves at every epoch end, on stop and at the end."""
        config = self.config
        resume_path = resolve_resume(config.resume, self.out)
        if resume_path is not None:
            self.resume(resume_path)
        self.method.train()
        max_steps = min(config.max_steps or self.total_steps, self.total_steps)
        bar = tqdm(
            total=max_steps * config.batch_size,
            initial=self.state.global_step * config.batch_size,
            unit="img",
            unit_scale=True,
            desc=self.method.name,
            disable=not dist.is_main_process() or not config.progress,
            dynamic_ncols=True,
        )
        stopped_by: str | None = None
        self.print(
            f"precision: {resolve_amp(config.amp, self.device)} (--amp {config.amp}), "
            f"channels_last: {self.channels_last}, device: {self.device}"
        )
        self.budget = TimeBudget(config.time_budget) if config.time_budget else None
        with StopRequested(config.time_budget) as stop:
            while self.state.epoch < config.epochs and self.state.global_step < max_steps:
                stopped_by = self._run_epoch(bar, stop, max_steps)
                if stopped_by:
                    break
        bar.close()
        if self._saved_at_step != self.state.global_step:
            self.save()
        if stopped_by in ("signal", "time_budget"):
            self.print(
                f"stopped by {stop.reason} after step {self.state.global_step}; checkpoint saved to "
                f"{self.out / CHECKPOINT_NAME} (continue with --resume auto)"
            )
        if dist.is_main_process() and (self.state.history or self.state.loss_curve):
            plot_history(self.state, self.steps_per_epoch, self.out / "training.png")
        if self.log:
            self.log.close()
        return self.summary_metrics() | {"stopped_by": stopped_by}

    def _run_epoch(self, bar: tqdm, stop: StopRequested, max_steps: int) -> str | None:
        config, state = self.config, self.state
        batches = epoch_indices(
            len(self.dataset), state.epoch, config.seed, self.rank, self.world, self.local_batch
        )
        loss_sum = torch.zeros((), device=self.device)
        steps_done = 0
        started, images_at_start = time.perf_counter(), state.global_step
        for step in range(state.step_in_epoch, self.steps_per_epoch):
            loss, metrics = self.train_step(batches[step])
            loss_sum += loss
            steps_done += 1
            state.step_in_epoch = step + 1
            bar.update(config.batch_size)
            if state.global_step % config.log_every == 0 or state.global_step == max_steps:
                self._log_step(loss, metrics, started, images_at_start)
            self._follow_budget(stop, bar)
            if state.step_in_epoch == self.steps_per_epoch:
                break  # the epoch's end: record and save below before stopping for any reason
            if state.global_step >= max_steps:
                return "max_steps"
            if stop.requested():
                return stop.stopped_by
        # Epoch finished: record, monitor, checkpoint.
        elapsed = time.perf_counter() - started
        row = {
            "epoch": state.epoch + 1,
            "step": state.global_step,
            "loss": float(loss_sum) / max(steps_done, 1),
            "lr": self.scheduler.get_last_lr()[0],
            "images_per_s": steps_done * config.batch_size / max(elapsed, 1e-9),
        }
        state.epoch += 1
        state.step_in_epoch = 0
        if (
            self.knn
            and config.knn_every
            and (state.epoch % config.knn_every == 0 or state.epoch == config.epochs)
        ):
            power = config.whiten_power if config.whitening == "pca" else None
            row.update(
                self.knn.evaluate(
                    self.embedding_network(),
                    self.mean,
                    self.std,
                    self.device,
                    self.amp_dtype,
                    power,
                )
            )
        state.history.append(row)
        if self.log:
            for key, value in row.items():
                if key not in ("epoch", "step"):
                    self.log.add_scalar(f"epoch/{key}", value, state.global_step)
        knn_text = (
            f" kNN top-1 {row['knn/top1']:.2f}% top-5 {row['knn/top5']:.2f}%" if "knn/top1" in row else ""
        )
        self.print(f"epoch {state.epoch}/{config.epochs} loss {row['loss']:.4f}{knn_text}")
        self.save()
        if state.global_step >= max_steps and state.global_step < self.total_steps:
            return "max_steps"
        return stop.stopped_by if stop.requested() else None

    def _follow_budget(self, stop: StopRequested, bar: tqdm) -> None:
        """With --time-budget: refit the schedule's total steps to the measured rate (the progress
        bar follows, so its ETA is the budget's), and end the run (as the budget's end) when the
        fitted schedule is done, i.e. annealed."""
        if self.budget is None:
            return
        self._steps_this_process += 1
        seconds_per_step = self.budget.step_done(self._steps_this_process)
        if seconds_per_step is not None:
            before = self.schedule.total
            total = self.schedule.refit(self.state.global_step, seconds_per_step, self.budget.seconds_left())
            if total * self.config.batch_size != bar.total:
                bar.total = total * self.config.batch_size
                bar.refresh()
            if before == self.schedule.planned and total != before:
                self.print(
                    f"--time-budget {self.config.time_budget:g}s at {1 / seconds_per_step:.2f} steps/s: "
                    f"schedule fitted to ~{total} steps (warm-up {self.schedule.warmup_steps}), "
                    f"not {self.schedule.planned}"
                )
        if self.state.global_step >= self.schedule.total:
            stop.budget_spent = True

    def _log_step(self, loss: torch.Tensor, metrics: dict[str, Any], started: float, first_step: int) -> None:
        value = float(loss)
        if not math.isfinite(value):
            raise TrainingError(
                f"loss is {value} at step {self.state.global_step}; lower --lr or use --amp none / --agc-clip"
            )
        step = self.state.global_step
        self.state.loss_curve.append((step, value))
        if not self.log:
            return
        rate = (step - first_step) * self.config.batch_size / max(time.perf_counter() - started, 1e-9)
        self.log.add_scalar("train/loss", value, step)
        self.log.add_scalar("train/lr", self.scheduler.get_last_lr()[0], step)
        self.log.add_scalar("train/images_per_s", rate, step)
        for key, metric in metrics.items():
            self.log.add_scalar(f"train/{key}", float(metric), step)
