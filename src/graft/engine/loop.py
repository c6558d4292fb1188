"""The training loop: phases of epochs of steps, with side concerns as hooks.

A *phase* fixes what learns (the frozen-base feature-extraction phase, the fine-tuning phase)
and gets a fresh optimizer, as Keras recompiles between the tutorial's two phases. The loop's
position (``LoopState``) plus model, optimizer, schedule and RNG states is everything a
snapshot holds, so a run continues exactly from any epoch end or any interrupted batch.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from graft.data.dataset import EpochBatchSampler, ImageDataset, eval_loader, train_loader
from graft.errors import GraftError, Interrupted  # Interrupted lives there so the CLI can catch it without importing torch
from graft.engine.inference import autocast
from graft.models import surgery
from graft.engine import checkpoint, distributed
from graft.engine.solver import LRSchedule, make_optimizer
from graft.engine.task import Task


@dataclass(frozen=True)
class Phase:
    name: str  # "feature-extract" or "fine-tune"
    epochs: int
    trainable_from: int | None  # first backbone layer that learns; None: the whole backbone is frozen
    lr: float
    freeze: tuple[str, ...] = ()  # parameter name patterns frozen in this phase only (e.g. a head's old rows)

    @property
    def backbone_frozen(self) -> bool:
        return self.trainable_from is None


@dataclass
class PhaseData:
    """What a phase trains and validates on. With ``forward`` set, the batches are something the
    part of the network below it already computed once (cached embeddings or activations) and
    ``forward`` maps them to logits; otherwise they are images and the whole model runs."""

    train: Dataset
    val: Dataset | None
    forward: nn.Module | None = None
    workers: int | None = None  # None: the trainer's
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # (logits, labels, inputs) -> loss; None: cross-entropy


@dataclass
class LoopState:
    phase: int = 0
    epoch_in_phase: int = 0  # completed epochs of the current phase
    epoch: int = 0  # completed epochs of the run
    iteration: int = 0  # optimizer steps of the run
    phase_iteration: int = 0
    batch: int = 0  # batches already done in an interrupted epoch
    phase_stopped: bool = False  # a hook ended the current phase early (early stopping)
    running: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "seen": 0.0, "seconds": 0.0})  # an epoch's sums so far (plus the task's)
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0  # seconds spent in fit() by earlier sessions of this run


class Hook:
    """Called by the loop; override what you need. ``trainer`` gives access to everything.
    A hook with state of its own gives ``state_dict``/``load_state_dict``: it goes into every
    snapshot under the hook's ``key``, so a resumed run continues the hook too."""

    key: str | None = None  # set to keep the hook's state in snapshots

    def before_epoch(self, trainer: Trainer) -> None: ...
    def after_step(self, trainer: Trainer, loss: float) -> None: ...
    def after_epoch(self, trainer: Trainer, row: dict[str, Any]) -> None: ...
    def after_phase(self, trainer: Trainer) -> None: ...
    def on_interrupt(self, trainer: Trainer) -> str | None: ...
    def after_train(self, trainer: Trainer) -> None: ...
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def phase_param_groups(model: nn.Module, phase: Phase, solver: Any, freeze_patterns: list[str], lr_rules: list[Any]) -> list[dict[str, Any]]:
    """Make exactly what ``phase`` trains require gradients; return its optimizer groups.
    Order: everything unfrozen, then the phase's frozen layers, ``model.freeze`` patterns and
    ``lr_mult: 0`` rules frozen."""
    surgery.unfreeze_all(model)
    if phase.backbone_frozen:
        surgery.freeze_backbone(model)
    surgery.freeze(model, before=phase.trainable_from, patterns=[*freeze_patterns, *phase.freeze])
    surgery.apply_lr_mult_freezing(model, lr_rules)
    return surgery.param_groups(model, lr=phase.lr, weight_decay=solver.weight_decay, rules=lr_rules, no_decay_bias_norm=solver.no_decay_bias_norm)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        phases: list[Phase],
        *,
        solver: Any,
        train_data: ImageDataset,
        val_data: ImageDataset | None,
        device: torch.device,
        amp: bool = False,
        workers: int = 0,
        freeze_patterns: list[str] = (),
        lr_rules: list[Any] = (),
        task: Task,
        hooks: list[Hook] = (),
        data_for_phase: Any = None,
        channels_last: bool = False,
        sync_bn: bool = False,
    ) -> None:
        self.model, self.phases, self.solver = model, phases, solver
        self.train_data, self.val_data = train_data, val_data
        self.device, self.amp, self.workers = device, amp and device.type == "cuda", workers
        self.freeze_patterns, self.lr_rules = list(freeze_patterns), list(lr_rules)
        self.task = task
        self.hooks = list(hooks)
        self.state = LoopState()
        self.sampler = self._sampler(len(train_data))  # rebuilt per phase
        self.wrapped: dict[int, nn.Module] = {}  # what learns, under DistributedDataParallel, this phase
        self.data_for_phase = data_for_phase or (lambda phase: None)
        self.data: PhaseData | None = None
        self.loader = self.val_loader = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule: LRSchedule | None = None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and not torch.cuda.is_bf16_supported()) if self.amp else None
        self.stop_requested = False  # set by Ctrl-C (or torchrun's SIGTERM)
        self.stop_agreed = False  # with several processes: some rank had a stop request at the last step
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if sync_bn and distributed.active():
            distributed.synchronise_batchnorm(self.model, device)

    # ------------------------------------------------------------------ phase set-up

    @property
    def phase(self) -> Phase:
        return self.phases[self.state.phase]

    def _sampler(self, n: int) -> EpochBatchSampler:
        world = distributed.world()
        if world > 1 and self.solver.batch_size < 2 * world:
            raise GraftError(f"solver.batch_size {self.solver.batch_size} is the global batch: {world} processes need at least {2 * world} (2 images each); raise --batch-size or start fewer processes")
        if world > 1 and n < 2 * world:
            raise GraftError(f"{n} training samples cannot be shared by {world} processes (2 each at least): start fewer processes (--devices / --nproc-per-node) or add images")
        return EpochBatchSampler(n, self.solver.batch_size, seed=self.solver.seed, rank=distributed.rank(), world=distributed.world())

    def configure_phase(self, phase: Phase) -> None:
        """Set what learns for ``phase`` and build its optimizer and schedule."""
        groups = phase_param_groups(self.model, phase, self.solver, self.freeze_patterns, self.lr_rules)
        self.wrapped = {}  # a phase change re-wraps what learns (DDP sees requires_grad when it wraps)
        self.data = self.data_for_phase(phase) or PhaseData(self.train_data, self.val_data)
        # A phase may train on more samples than there are images (e.g. sampled negatives).
        self.sampler = self._sampler(len(self.data.train))
        workers = self.workers if self.data.workers is None else self.data.workers
        pin = self.device.type == "cuda"
        collate = self.task.collate
        self.loader = train_loader(self.data.train, self.sampler, workers=workers, pin_memory=pin, collate_fn=collate)
        val = self.data.val
        # Each rank validates its shard; the task gathers the outputs (every image counted once).
        self.val_loader = eval_loader(val, batch_size=self.solver.batch_size, workers=workers, pin_memory=pin, collate_fn=collate, part=distributed.shard(len(val))) if val is not None and len(val) else None
        self.optimizer = make_optimizer(groups, self.solver)
        per_epoch = len(self.sampler)
        total = phase.epochs * per_epoch
        if self.solver.max_iter:
            total = min(total, self.solver.max_iter)
        self.schedule = LRSchedule(self.optimizer, self.solver, total_iters=total, iters_per_epoch=per_epoch)

    def parallel(self, module: nn.Module) -> nn.Module:
        """``module`` as this phase trains it. With several processes it runs under
        DistributedDataParallel: a task passes only what learns (the head on a frozen backbone's
        features, the suffix above cached activations, the whole model when fine-tuning), so a
        frozen backbone stays outside, and the wrapper is rebuilt each phase. One process: ``module``.
        Ask for it before any forward of the step: wrapping syncs the weights in place."""
        if not distributed.active():
            return module
        if id(module) not in self.wrapped:
            self.wrapped[id(module)] = distributed.wrap(module, self.device)
        return self.wrapped[id(module)]

    def phase_done(self) -> bool:
        cap = self.solver.max_iter
        return self.state.phase_stopped or self.state.epoch_in_phase >= self.phase.epochs or bool(cap and self.state.phase_iteration >= cap)

    def stop_phase(self) -> None:
        """End the current phase after this epoch (the run goes on with the next phase)."""
        self.state.phase_stopped = True

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: dict[str, Any] | None = None, *, until_epoch: int | None = None) -> LoopState:
        """Run every remaining phase. ``resume`` is a loaded snapshot payload. ``until_epoch``:
        pause once that many epochs are done, before the next one (no ``after_train`` hooks);
        ``snapshot_payload()`` then continues the run exactly, as a snapshot would."""
        if resume is not None:
            self.state = LoopState(**resume["loop"])
            if not distributed.is_main():  # rank 0 carries the ranks' sums of an interrupted epoch
                self.state.running = {k: (v if k in ("lr", "seconds") else 0.0) for k, v in self.state.running.items()}
            for hook in self.hooks:
                key = getattr(hook, "key", None)
                if key and key in resume.get("hooks", {}):
                    hook.load_state_dict(resume["hooks"][key])
        self._fit_started = time.perf_counter()
        self._elapsed_before = self.state.elapsed
        previous = signal.getsignal(signal.SIGINT)
        previous_term = signal.getsignal(signal.SIGTERM)
        if previous is signal.default_int_handler:  # only where Python handles Ctrl-C itself (main thread)
            signal.signal(signal.SIGINT, self._request_stop)
            if distributed.launched():  # torchrun passes Ctrl-C on to its workers as SIGTERM
                signal.signal(signal.SIGTERM, self._request_stop)
        try:
            while self.state.phase < len(self.phases):
                self.configure_phase(self.phase)
                if resume is not None:
                    self._load_solver_state(resume)
                    resume = None
                while not self.phase_done():
                    if until_epoch is not None and self.state.epoch >= until_epoch:
                        return self.state
                    self.run_epoch()
                    if self.stopping:
                        raise Interrupted(self._on_interrupt())
                for hook in self.hooks:
                    if hasattr(hook, "after_phase"):
                        hook.after_phase(self)
                self.state.phase += 1
                self.state.epoch_in_phase = self.state.phase_iteration = 0
                self.state.phase_stopped = False
        finally:
            if signal.getsignal(signal.SIGINT) == self._request_stop:
                signal.signal(signal.SIGINT, previous)
            if signal.getsignal(signal.SIGTERM) == self._request_stop:
                signal.signal(signal.SIGTERM, previous_term)
        for hook in self.hooks:
            hook.after_train(self)
        return self.state

    @property
    def session_seconds(self) -> float:
        """Seconds this session has spent in ``fit``."""
        started = getattr(self, "_fit_started", None)
        return 0.0 if started is None else time.perf_counter() - started

    def elapsed(self) -> float:
        """Seconds spent in ``fit`` by every session of this run."""
        return getattr(self, "_elapsed_before", self.state.elapsed) + self.session_seconds

    @property
    def stopping(self) -> bool:
        """Stop after this step? Every rank answers alike: they agree on it at each step."""
        return self.stop_agreed if distributed.active() else self.stop_requested

    def _request_stop(self, signum: int, frame: Any) -> None:
        # A second Ctrl-C stops now. Under torchrun a Ctrl-C arrives twice (from the terminal and,
        # as SIGTERM, from the launcher): the ranks finish the step and write ``last`` together.
        if self.stop_requested and not distributed.launched():
            raise KeyboardInterrupt
        self.stop_requested = True

    def _on_interrupt(self) -> str | None:
        path = None
        for hook in self.hooks:
            path = hook.on_interrupt(self) or path
        return path

    def run_epoch(self) -> None:
        st = self.state
        if st.batch == 0:
            st.running["lr"] = self.schedule.lr  # the rate the epoch starts at, for the history
        self.sampler.set_epoch(st.epoch, st.batch)
        for hook in self.hooks:
            hook.before_epoch(self)
        self.model.train()
        started = time.perf_counter()
        for inputs, targets in self.loader:
            loss, sums = self.step(inputs, targets)
            n = self.task.batch_size(targets)
            st.iteration += 1
            st.phase_iteration += 1
            st.batch += 1
            st.running["loss"] += loss * n
            st.running["seen"] += n
            for key, value in sums.items():
                st.running[key] = st.running.get(key, 0.0) + value
            for hook in self.hooks:
                hook.after_step(self, loss)
            if self.stopping or (self.solver.max_iter and st.phase_iteration >= self.solver.max_iter):
                break
        st.running["seconds"] += time.perf_counter() - started
        if self.stopping:
            return
        self.finish_epoch()

    def step(self, inputs: Any, targets: Any) -> tuple[float, dict[str, float]]:
        """One optimizer step on one batch; returns (mean loss, the task's per-batch sums)."""
        inputs, targets = self.task.to_device(inputs, targets, self)
        with autocast(self.device, self.amp):
            loss, sums = self.task.training_loss(self, inputs, targets)
        if not torch.isfinite(loss):
            raise GraftError(f"training diverged: the loss became {loss.item()} at iteration {self.state.iteration}; lower solver.base_lr (snapshots of earlier epochs are kept)")
        self.optimizer.zero_grad(set_to_none=True)
        loss_for_grad = loss
        if distributed.active():
            # DDP averages gradients over the ranks; weighting each rank's mean by its share of the
            # global batch makes that average the gradient of the global batch's mean loss, as one
            # process computes it (also when the last batch splits unevenly). The same reduction
            # agrees on a stop request (Ctrl-C reaches the ranks at different steps).
            n = self.task.batch_size(targets)
            total, stops = distributed.all_sum([n, float(self.stop_requested)])
            loss_for_grad = loss * (n * distributed.world() / total)
            self.stop_agreed = stops > 0
        if self.scaler is not None:
            self.scaler.scale(loss_for_grad).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss_for_grad.backward()
            self.optimizer.step()
        self.schedule.step()
        return loss.item(), sums

    def finish_epoch(self) -> None:
        st = self.state
        st.running = self._global_running()
        distributed.same_buffers(self.model)
        val = self.task.validate(self)
        row = {
            "epoch": st.epoch + 1,
            "phase": self.phase.name,
            "lr": st.running.get("lr", self.schedule.lr),
            **self.task.train_columns(st.running),
            **val,
            "seconds": round(st.running["seconds"], 3),
        }
        row = distributed.broadcast(row)  # rank 0's row: what follows from it is decided alike everywhere
        val_loss = row.get("val_loss")
        self.schedule.epoch_end(val_loss)
        st.history.append(row)
        st.epoch += 1
        st.epoch_in_phase += 1
        st.batch = 0
        st.running = {"loss": 0.0, "seen": 0.0, "seconds": 0.0}
        for hook in self.hooks:
            hook.after_epoch(self, row)

    # ------------------------------------------------------------------ snapshots

    def _global_running(self) -> dict[str, float]:
        """The epoch's sums so far over every rank (the lr and the seconds are each rank's own)."""
        running = self.state.running
        if not distributed.active():
            return running
        keys = [k for k in running if k not in ("lr", "seconds")]
        return {**running, **dict(zip(keys, distributed.all_sum([running[k] for k in keys])))}

    def snapshot_payload(self) -> dict[str, Any]:
        """Everything to continue the run; with several processes a collective (every rank calls
        it): the epoch's sums are the ranks' total and each rank's RNG state is kept."""
        self.state.elapsed = self.elapsed()
        rngs = distributed.all_gather(checkpoint.capture_rng())
        loop = asdict(self.state)
        loop["running"] = self._global_running()
        return {
            "loop": loop,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": checkpoint.optimizer_state(self.optimizer),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rngs[0],
            "rng_ranks": rngs,
            "world": distributed.world(),
            "launch": os.environ.get("TORCHELASTIC_RUN_ID"),  # which torchrun launch made it (restarts continue only their own)
            "hooks": {hook.key: hook.state_dict() for hook in self.hooks if getattr(hook, "key", None)},
        }

    def _load_solver_state(self, payload: dict[str, Any]) -> None:
        checkpoint.load_optimizer_state(self.optimizer, payload["optimizer"])
        self.schedule.load_state_dict(payload["schedule"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        same_world = payload.get("world", 1) == distributed.world() and len(payload.get("rng_ranks") or []) == distributed.world()
        checkpoint.restore_rng(payload["rng_ranks"][distributed.rank()] if same_world else payload["rng"])
        if not same_world and distributed.rank() > 0:  # rank 0 continues the saved stream; the others get streams of their own
            torch.manual_seed(torch.initial_seed() + distributed.rank())

