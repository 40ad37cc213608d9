"""The training loop, and the start-up checks that let it run for days without surprises.

The model, data, optimizer, schedule and strategy come from their own packages; the trainer only
knows the optimizer hook protocol (llmtrain/optim/protocol.py), never an optimizer's name.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from llmtrain import checkpoint, checkpoint_store, lineage
from llmtrain.config import RootConfig, validate
from llmtrain.cpu_matmul import set_cpu_matmul
from llmtrain.distributed import (
    all_reduce_max, all_reduce_mean, barrier, broadcast_object, comm_bytes, grad_sync, init_distributed, on_main,
    parallelize, shutdown, unwrap,
)
from llmtrain.errors import ConfigError, ResourceError, UserError
from llmtrain.hardware import peak_flops
from llmtrain.logging import RunLogger
from llmtrain.optim.protocol import StepContext, state_bytes
from llmtrain.optim.sharded import shard_optimizer
from llmtrain.plan import check_fits
from llmtrain.preemption import StopRequest
from llmtrain.resume import TRAINER_KEYS, Resumed, hyperparameter_keys, resume
from llmtrain.run_lock import RunLock
from llmtrain.schedules import lr_factor


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 autocast on a bf16-capable GPU, fp32 elsewhere (bf16 on CPU is ~25x slower)."""
    if precision == "auto":
        bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_gpu else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Trainer:
    """One run: built from a config in a run directory, then ``fit()``.

    Start-up does every check that can fail before the first step (lock, config, data, memory,
    checkpoint directory, resume), so a mistake never costs a run's work.
    """

    def __init__(self, cfg: RootConfig, run_dir: str | Path):
        self.cfg = cfg
        self.env = env = init_distributed(cfg.train.device, cfg.distributed.strategy, cfg.distributed.timeout_s)
        validate(cfg, dp_world_size=env.world_size)
        # Rank 0's run_dir for everyone: Hydra's default dir is a timestamp each process takes itself.
        self.run_dir = Path(broadcast_object(str(run_dir), env))
        self.stop = StopRequest().install()  # a signal during start-up stops the run after its first step
        self.lock: Optional[RunLock] = None
        self.finished: Optional[dict[str, Any]] = None
        try:
            self.lock = on_main(lambda: RunLock.acquire(self.run_dir), env)
            if cfg.resume == "auto":
                self.finished = lineage.finished_summary(self.run_dir, cfg.train.max_steps)
            if self.finished is None:
                self._build()
        except BaseException:
            self._release()
            raise

    def _build(self) -> None:
        from llmtrain.data import build_data, check_vocab
        from llmtrain.data.budget import epochs_warning, prepared_size, run_budget
        from llmtrain.models import build_model
        from llmtrain.optim import build_optimizer

        cfg, t, env = self.cfg, self.cfg.train, self.env
        took_over = self.lock.took_over if self.lock else None
        notes = [f"run_dir lock taken over from a stale holder ({took_over})"] if took_over else []
        notes += on_main(lambda: checkpoint_store.adopt_and_clean(self.run_dir), env) or []
        on_main(lambda: checkpoint_store.check_writable(self.run_dir), env)
        choice = lineage.choose(cfg.resume, self.run_dir)
        self.accum_steps = t.global_batch_size // (t.micro_batch_size * env.world_size)
        self.dtype = resolve_precision(t.precision, env.device)
        seed_everything(t.seed)

        check_fits(cfg, env.world_size, env.strategy, env.device)  # before any data preparation or allocation
        if cfg.model.init_from and not choice.candidates:  # a hub id that cannot be had fails now, not after the data
            from llmtrain.export import check_init_from

            check_init_from(cfg.model.init_from)
        self.data = build_data(cfg.data, seq_len=t.seq_len, seed=t.seed, rank=env.rank, world_size=env.world_size,
                               micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                               evals=t.eval_every > 0)
        cfg.model.vocab_size = check_vocab(cfg.model.vocab_size, self.data, cfg.data.pad_vocab_to_multiple_of)
        self.token_budget = run_budget(t.max_steps, t.global_batch_size, t.seq_len, list(cfg.data.sources),
                                       prepared_size(self.data.meta))
        notes += [w for w in (epochs_warning(self.token_budget),) if w]
        self.config = OmegaConf.to_container(OmegaConf.structured(cfg))  # what runs, as config.yaml records it

        set_cpu_matmul(t.cpu_matmul)
        model = build_model(cfg.model).to(env.device)
        if cfg.model.init_from and not choice.candidates:
            from llmtrain.export import load_init_weights

            load_init_weights(model, cfg.model.init_from)
        self.params = sum(p.numel() for p in model.parameters())
        self.model = parallelize(model, env, compile=t.compile, param_dtype=self.dtype, options=cfg.distributed)
        self.optimizer = shard_optimizer(build_optimizer(cfg, unwrap(self.model)), env, cfg.optim.get("name"),
                                         loss_scaling=self.dtype == torch.float16)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        refuse = getattr(self.optimizer, "refuse", None)
        reason = refuse(env.strategy, self.accum_steps) if callable(refuse) else None
        if reason:
            raise ConfigError("optim.name", reason)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.dtype == torch.float16)
        ckpt_bytes = self._checkpoint_bytes()
        on_main(lambda: checkpoint_store.check_free_space(self.run_dir, ckpt_bytes, t.keep_checkpoints), env)

        self.step, self.tokens, self.nonfinite_total, self.nonfinite_streak = 0, 0, 0, 0
        self.elapsed = 0.0  # training wall-clock seconds, excluding eval and checkpointing
        resumed = resume(choice, self.config, self._restore, env, self.run_dir, notes.append)
        self._saved_step = self.step if resumed else None
        if env.is_main:
            self._set_aside_history(choice, resumed, notes)
        self.log = RunLogger(self.run_dir, cfg.logger, self.config, enabled=env.is_main, total_steps=t.max_steps,
                             start_step=self.step, progress=t.progress_bar,
                             wandb_run_id=resumed.state.get("wandb_run_id") if resumed else None)
        if env.is_main:
            self._record_start(resumed, notes)

    def _restore(self, path: Path) -> dict[str, Any]:
        """Load a checkpoint into the model and optimizer; the trainer's own counters follow."""
        self._hook("eval")  # the checkpoint holds evaluation weights; enter training mode from there
        state = checkpoint.restore(path, unwrap(self.model), self.optimizer,
                                   keep_current=hyperparameter_keys(self.cfg.optim))
        self._hook("train")
        if isinstance(state, dict) and all(k in state for k in TRAINER_KEYS):
            self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
            self.nonfinite_total, self.nonfinite_streak = state["nonfinite_total"], state["nonfinite_streak"]
            self.data.train.load_state_dict(state["data"])
            self.scaler.load_state_dict(state["scaler"])
            checkpoint.set_rng_state(state["rng"])
        return state

    def _set_aside_history(self, choice: lineage.ResumeChoice, resumed: Optional[Resumed], notes: list[str]) -> None:
        """Rank 0: what lies after the resume step leaves the line (moved under abandoned/, never deleted)."""
        newer = lineage.newer_checkpoints(self.run_dir, self.step) if choice.explicit and resumed else []
        label = (f"rollback-to-{resumed.path.name}" if newer else f"after-{resumed.path.name}") if resumed \
            else "restart-at-step_0"
        dest = lineage.set_aside_after(self.run_dir, self.step, label, newer)
        if newer:
            notes.append(f"rolled back to {resumed.path.name}: {', '.join(p.name for p in newer)} and the metrics "
                         f"rows after step {self.step} moved to {dest}")
        elif dest is not None:
            notes.append(f"metrics rows after step {self.step} (not in any checkpoint) moved to {dest}")

    def _record_start(self, resumed: Optional[Resumed], notes: list[str]) -> None:
        """Rank 0: record config changes, write config.yaml and the tokenizer, print the notes."""
        if resumed is not None:
            notes.append(f"resumed from {resumed.path} at step {self.step}")
            if resumed.saved_config is None:
                notes.append(f"warning: {resumed.path.name} has no saved config (an older llmtrain wrote it): "
                             f"config changes on this resume cannot be checked")
            for key, (old, new) in resumed.changes.items():
                notes.append(f"config change on resume: {key} {old!r} -> {new!r}{self._lr_effect(key, resumed)}")
            if resumed.changes:
                self.log.record({"step": self.step, "config_change": {k: list(v) for k, v in resumed.changes.items()}})
            if self.cfg.model.init_from:
                notes.append("note: model.init_from is ignored when resuming (the checkpoint's weights are used)")
        lineage.write_config(self.run_dir, self.config, self.step)
        if self.data.tokenizer_path and Path(self.data.tokenizer_path).is_file():
            shutil.copyfile(self.data.tokenizer_path, self.run_dir / "tokenizer.json")
        for text in notes:
            self.log.note(text)

    def _lr_effect(self, key: str, resumed: Resumed) -> str:
        """For a schedule, max_steps or lr change: the lr at the resume step before and after."""
        if not (key.startswith("schedule.") or key in ("train.max_steps", "optim.lr")) or not resumed.saved_config:
            return ""
        old, s = resumed.saved_config, resumed.saved_config.get("schedule", {})
        before = float(old["optim"]["lr"]) * lr_factor(
            s["name"], self.step, total_steps=old["train"]["max_steps"], warmup_steps=s["warmup_steps"],
            min_lr_ratio=s["min_lr_ratio"], decay_ratio=s["decay_ratio"], decay_shape=s["decay_shape"],
            num_cycles=s["num_cycles"])
        after = float(self.cfg.optim["lr"]) * self.lr_factor(self.step)
        return f" (lr at step {self.step}: {before:.3e} -> {after:.3e})"

    def _checkpoint_bytes(self) -> int:
        """One checkpoint on disk: fp32 weights and the optimizer state (the planner's bytes per parameter)."""
        from llmtrain.plan import optimizer_state_bytes_per_param

        state_bpp, _ = optimizer_state_bytes_per_param(self.cfg.optim)
        return int(self.params * (4 + state_bpp)) + (1 << 20)

    def close(self) -> None:
        """Give back the run_dir lock and the signal handlers of a trainer that will not ``fit()``."""
        self._release()

    def _release(self) -> None:
        self.stop.uninstall()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ---------------------------------------------------------------- one optimizer step
    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(x)

    def forward_backward(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Sum of micro-batch losses / accum_steps, so the gradient equals one full-batch step."""
        total = torch.zeros((), device=self.env.device)
        owns_backward = getattr(self.optimizer, "owns_backward", False)
        for i, (x, y) in enumerate(micro_batches):
            with grad_sync(self.model, enabled=i == len(micro_batches) - 1):
                logits = self.forward(x)
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1)) / len(micro_batches)
                if owns_backward:
                    self.optimizer.backward(loss)
                else:
                    self.scaler.scale(loss).backward()
            total += loss.detach()
        return total

    def clip_gradients(self) -> torch.Tensor:
        """Global grad norm before clipping (clipping off when train.grad_clip == 0)."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def train_step(self) -> dict[str, Any]:
        t, opt = self.cfg.train, self.optimizer
        micro = [tuple(b.to(self.env.device) for b in self.data.train.next_batch()) for _ in range(self.accum_steps)]
        factor = self.lr_factor(self.step)
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor

        loss = self.forward_backward(micro)
        owns_backward = getattr(opt, "owns_backward", False)
        grad_norm = torch.tensor(getattr(opt, "last_grad_norm", float("nan"))) if owns_backward else self.clip_gradients()
        loss = all_reduce_mean(loss, self.env)
        finite = bool(torch.isfinite(loss)) and (self.scaler.is_enabled() or owns_backward or bool(torch.isfinite(grad_norm)))
        if finite and not owns_backward:
            ctx = StepContext(self.model, micro, self.forward, self.step)
            self._hook("before_step", ctx)
            if getattr(opt, "requires_closure", False):
                self.scaler.step(opt, closure=self._closure(micro))
            else:
                self.scaler.step(opt)
            self.scaler.update()
            self._hook("after_step", ctx)
        opt.zero_grad(set_to_none=True)
        self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
        self.nonfinite_total += 0 if finite else 1
        self.step += 1
        self.tokens += t.global_batch_size * t.seq_len
        return {"loss": float(loss), "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"], "skipped": not finite}

    def _closure(self, micro):
        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = self.forward_backward(micro)
            self.clip_gradients()
            return loss

        return closure

    def _hook(self, name: str, *args) -> None:
        fn = getattr(self.optimizer, name, None)
        if callable(fn):
            fn(*args)

    def lr_factor(self, step: int) -> float:
        s = self.cfg.schedule
        return lr_factor(s.name, step, total_steps=self.cfg.train.max_steps, warmup_steps=s.warmup_steps,
                         min_lr_ratio=s.min_lr_ratio, decay_ratio=s.decay_ratio, decay_shape=s.decay_shape,
                         num_cycles=s.num_cycles)

    # ---------------------------------------------------------------- eval, checkpoint, resume
    @contextlib.contextmanager
    def eval_weights(self):
        """Evaluation weights (Schedule-Free keeps two sequences), model in eval mode."""
        self._hook("eval")
        self.model.eval()
        try:
            yield
        finally:
            self.model.train()
            self._hook("train")

    @torch.no_grad()
    def evaluate(self) -> float:
        with self.eval_weights():
            losses = []
            for x, y in self.data.val_batches(self.cfg.train.eval_steps):
                logits = self.forward(x.to(self.env.device))
                losses.append(F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.to(self.env.device).view(-1)))
            loss = torch.stack(losses).mean() if losses else torch.tensor(float("nan"), device=self.env.device)
        return float(all_reduce_mean(loss, self.env))

    def save(self) -> Path:
        """Checkpoint the current step (once: a step already saved is not written again).

        A failed write (a full disk, a lost mount) is one line naming it, on every rank; the
        previous checkpoints are untouched, since a new one only replaces them once complete."""
        final = checkpoint_store.checkpoint_root(self.run_dir) / f"step_{self.step}"
        if self._saved_step == self.step:
            return final
        with self.eval_weights():
            state = {
                "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed,
                "nonfinite_total": self.nonfinite_total, "nonfinite_streak": self.nonfinite_streak,
                "rng": checkpoint.rng_state(), "data": self.data.train.state_dict(),
                "scaler": self.scaler.state_dict(), "wandb_run_id": self.log.wandb_run_id,
            }
            keep = self.cfg.train.keep_checkpoints
            try:
                if self.env.world_size > 1:  # every rank writes its shards (torch.distributed.checkpoint)
                    checkpoint.save_sharded_checkpoint(self.run_dir, self.step, unwrap(self.model), self.optimizer,
                                                       state, self.env, keep=keep, config=self.config)
                elif self.env.is_main:
                    checkpoint.save_checkpoint(self.run_dir, self.step, unwrap(self.model).state_dict(),
                                               self.optimizer.state_dict(), state, keep=keep, config=self.config)
            except OSError as err:
                raise self._save_failed(err) from None
            barrier(self.env)
        self._saved_step = self.step
        return final

    def _save_failed(self, err: OSError) -> ResourceError:
        if self.env.is_main:
            shutil.rmtree(checkpoint_store.tmp_dir(self.run_dir, self.step), ignore_errors=True)
        previous = checkpoint_store.latest_checkpoint(self.run_dir)
        kept = f"{previous.name} is untouched" if previous else "no earlier checkpoint exists"
        what = f"{err.strerror or err}{f' ({err.filename})' if err.filename else ''}"
        return ResourceError("checkpoints", f"saving step_{self.step} failed: {what}; {kept}")

    # ---------------------------------------------------------------- the loop
    def _agreed_stop(self) -> bool:
        """Whether any rank was signalled; every rank then knows which signal (one all-reduce per step)."""
        signum = int(all_reduce_max(self.stop.signum or 0, self.env))
        if signum and self.stop.signum is None:
            self.stop.signum = signum
        return bool(signum)

    def fit(self) -> dict[str, Any]:
        if self.finished is not None:
            return self._already_finished()
        try:
            summary = self._fit()
        finally:
            self._release()
        shutdown(self.env)
        return summary

    def _fit(self) -> dict[str, Any]:
        t = self.cfg.train
        status, reason, last = "completed", "", {}
        window_tokens, window_start = 0, time.perf_counter()
        try:
            while self.step < t.max_steps:
                start = time.perf_counter()
                last = self.train_step()
                self.elapsed += time.perf_counter() - start
                window_tokens += t.global_batch_size * t.seq_len
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    window_time = max(time.perf_counter() - window_start, 1e-9)
                    window_steps = window_tokens // (t.global_batch_size * t.seq_len)
                    self.log.log_train(self._train_row(last, window_tokens / window_time, window_steps))
                    window_tokens, window_start = 0, time.perf_counter()
                if self.nonfinite_streak >= max(1, t.max_nonfinite_in_a_row):
                    status = "diverged"
                    reason = f"{self.nonfinite_streak} non-finite losses in a row at step {self.step}"
                    break
                if self._agreed_stop():
                    status, reason = "stopped", f"signal {self.stop.name} at step {self.step}"
                    break
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                    self.log.log_eval(self._eval_row())
                    window_start = time.perf_counter()
                if t.save_every and self.step % t.save_every == 0 and self.step < t.max_steps:
                    self.save()
                    window_start = time.perf_counter()
            ckpt = self.save()  # before the final eval: a kill during it loses no training
            if status == "completed" and t.eval_every:
                self.log.log_eval(self._eval_row())
        except UserError as err:
            self.log.summary(self._summary("failed", str(err), last))
            raise
        summary = self._summary(status, reason, last)
        self.log.summary(summary)
        if status != "completed":
            self.log.note(f"{status}: {reason}; checkpoint saved to {ckpt}. "
                          f"Continue with: llmtrain run_dir={self.run_dir} resume=auto")
        elif t.sample_tokens:
            self.print_sample()
        self.log.close(summary)
        return summary

    def _already_finished(self) -> dict[str, Any]:
        """A completed run started again: say so and change nothing."""
        if self.env.is_main:
            print(f"{self.run_dir} already finished at step {self.finished['steps']} (train.max_steps="
                  f"{self.cfg.train.max_steps}); nothing to do. Raise train.max_steps to train further.")
        self._release()
        shutdown(self.env)
        return self.finished

    def _train_row(self, last: dict[str, Any], tokens_per_s: float, window_steps: int) -> dict[str, Any]:
        row = {"step": self.step, "loss": last["loss"], "lr": last["lr"], "grad_norm": last["grad_norm"],
               "tokens": self.tokens, "tokens_per_s": tokens_per_s, "peak_mem_bytes": peak_memory_bytes(self.env.device),
               "time_s": self.elapsed, "nonfinite_steps": self.nonfinite_total}
        sent = comm_bytes(self.model)  # counted only where a compression hook measures it (PowerSGD)
        if sent is not None:
            row["comm_bytes_per_step"] = sent / max(window_steps, 1)
        return row

    def _eval_row(self) -> dict[str, Any]:
        # no collective for bpb: the loss is already reduced, and every rank computes the same ratio
        loss = self.evaluate()
        return {"step": self.step, "tokens": self.tokens, "time_s": self.elapsed, "val_loss": loss,
                "val_bpb": self.data.val_bpb(loss, self.cfg.train.eval_steps)}

    def _summary(self, status: str, reason: str, last: dict[str, Any]) -> dict[str, Any]:
        m = self.cfg.model
        vals = [r["val_loss"] for r in self.log.eval_rows if math.isfinite(r["val_loss"])]
        bpbs = [b for r in self.log.eval_rows if isinstance(b := r.get("val_bpb"), float) and math.isfinite(b)]
        tokens_per_s = self.tokens / self.elapsed if self.elapsed > 0 else 0.0
        flops_per_token = 6 * self.params + 12 * m.n_layers * m.d_model * self.cfg.train.seq_len
        peak = peak_flops(self.env.device)  # None (mfu: null) on CPU and unknown GPUs
        opt_bytes = state_bytes(self.optimizer)
        return {
            "status": status, "reason": reason, "optimizer": self.cfg.optim.get("name"), "lr": self.cfg.optim.get("lr"),
            "steps": self.step, "tokens": self.tokens, "final_loss": last.get("loss"),
            "final_val_loss": self.log.eval_rows[-1]["val_loss"] if self.log.eval_rows else None,
            "best_val_loss": min(vals) if vals else None, "params": self.params,
            "final_val_bpb": self.log.eval_rows[-1].get("val_bpb") if self.log.eval_rows else None,
            "best_val_bpb": min(bpbs) if bpbs else None, "epochs_planned": self.token_budget["epochs"],
            "optimizer_state_bytes": opt_bytes, "optimizer_state_bytes_per_param": opt_bytes / max(1, self.params),
            "tokens_per_s": tokens_per_s, "peak_mem_bytes": peak_memory_bytes(self.env.device),
            "wall_time_s": self.elapsed, "nonfinite_steps": self.nonfinite_total,
            "mfu": flops_per_token * tokens_per_s / (peak * self.env.world_size) if peak else None,
            "world_size": self.env.world_size, "strategy": self.env.strategy, "precision": str(self.dtype).replace("torch.", ""),
            "signal": self.stop.name if status == "stopped" else None,
        }

    @torch.no_grad()
    def print_sample(self) -> None:
        tok = self.data.tokenizer
        ids = tok.encode(self.cfg.train.sample_prompt).ids or [self.data.eos_id]
        idx = torch.tensor([ids], device=self.env.device)
        with self.eval_weights():
            out = unwrap(self.model).generate(idx, self.cfg.train.sample_tokens, temperature=0.8, top_k=50)
        text = tok.decode(out[0].tolist())
        if self.env.is_main:
            (self.run_dir / "sample.txt").write_text(text + "\n")
            self.log.note("---- sample ----\n" + text + "\n----------------")
