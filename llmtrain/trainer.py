"""The training loop, nothing else.

The model, data, optimizer, schedule and strategy come from their own packages; the trainer only
knows the optimizer hook protocol (llmtrain/optim/protocol.py), never an optimizer's name.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from llmtrain import checkpoint
from llmtrain.config import RootConfig, validate
from llmtrain.cpu_matmul import set_cpu_matmul
from llmtrain.distributed import all_reduce_mean, barrier, comm_bytes, grad_sync, init_distributed, parallelize, shutdown, unwrap
from llmtrain.errors import ConfigError
from llmtrain.hardware import peak_flops
from llmtrain.logging import RunLogger
from llmtrain.optim.protocol import StepContext, state_bytes
from llmtrain.optim.sharded import shard_optimizer
from llmtrain.plan import check_fits
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
    def __init__(self, cfg: RootConfig, run_dir: str | Path, resolved_config: Optional[dict] = None):
        from llmtrain.data import build_data, check_vocab
        from llmtrain.models import build_model
        from llmtrain.optim import build_optimizer

        self.cfg, t = cfg, cfg.train
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.env = env = init_distributed(t.device, cfg.distributed.strategy, cfg.distributed.timeout_s)
        validate(cfg, dp_world_size=env.world_size)
        self.accum_steps = t.global_batch_size // (t.micro_batch_size * env.world_size)
        self.dtype = resolve_precision(t.precision, env.device)
        seed_everything(t.seed)

        check_fits(cfg, env.world_size, env.strategy, env.device)  # before any data preparation or allocation
        self.data = build_data(cfg.data, seq_len=t.seq_len, seed=t.seed, rank=env.rank, world_size=env.world_size,
                               micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size)
        cfg.model.vocab_size = check_vocab(cfg.model.vocab_size, self.data, cfg.data.pad_vocab_to_multiple_of)

        set_cpu_matmul(t.cpu_matmul)
        model = build_model(cfg.model).to(env.device)
        if cfg.model.init_from:
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
        use_scaler = self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=use_scaler)

        self.step, self.tokens, self.nonfinite_total, self.nonfinite_streak = 0, 0, 0, 0
        self.elapsed = 0.0  # training wall-clock seconds, excluding eval and checkpointing
        wandb_id = self._resume(checkpoint.resolve_resume(cfg.resume, self.run_dir))

        config = resolved_config or OmegaConf.to_container(OmegaConf.structured(cfg))
        if env.is_main:
            import shutil

            import yaml

            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            if self.data.tokenizer_path and Path(self.data.tokenizer_path).is_file():
                shutil.copyfile(self.data.tokenizer_path, self.run_dir / "tokenizer.json")
        self.log = RunLogger(self.run_dir, cfg.logger, config, enabled=env.is_main, total_steps=t.max_steps,
                             start_step=self.step, progress=t.progress_bar, wandb_run_id=wandb_id)
        self._stop_signal: Optional[int] = None

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
        with self.eval_weights():
            state = {
                "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed,
                "nonfinite_total": self.nonfinite_total, "nonfinite_streak": self.nonfinite_streak,
                "rng": checkpoint.rng_state(), "data": self.data.train.state_dict(),
                "scaler": self.scaler.state_dict(), "wandb_run_id": self.log.wandb_run_id,
            }
            path = checkpoint.checkpoint_root(self.run_dir) / f"step_{self.step}"
            if self.env.world_size > 1:  # every rank writes its shards (torch.distributed.checkpoint)
                path = checkpoint.save_sharded_checkpoint(self.run_dir, self.step, unwrap(self.model), self.optimizer,
                                                          state, self.env, keep=self.cfg.train.keep_checkpoints)
            elif self.env.is_main:
                path = checkpoint.save_checkpoint(self.run_dir, self.step, unwrap(self.model).state_dict(),
                                                  self.optimizer.state_dict(), state, keep=self.cfg.train.keep_checkpoints)
            barrier(self.env)
        return path

    def _resume(self, path: Optional[Path]) -> Optional[str]:
        if path is None:
            return None
        # Either layout (one file per kind, or DCP shards) onto this run's world size and strategy.
        self._hook("eval")  # the checkpoint holds evaluation weights; enter training mode from there
        state = checkpoint.restore(path, unwrap(self.model), self.optimizer)
        self._hook("train")
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.nonfinite_total, self.nonfinite_streak = state["nonfinite_total"], state["nonfinite_streak"]
        self.data.train.load_state_dict(state["data"])
        self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        if self.env.is_main:
            print(f"resumed from {path} at step {self.step}")
        return state.get("wandb_run_id")

    # ---------------------------------------------------------------- the loop
    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def _should_stop(self) -> bool:
        flag = torch.tensor(float(self._stop_signal is not None))
        return bool(all_reduce_mean(flag, self.env) > 0) if self.env.world_size > 1 else bool(flag)

    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
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
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                    self.log.log_eval(self._eval_row())
                    window_start = time.perf_counter()
                if t.save_every and self.step % t.save_every == 0 and self.step < t.max_steps:
                    self.save()
                    window_start = time.perf_counter()
                if self._should_stop():
                    status, reason = "stopped", f"signal {signal.Signals(self._stop_signal or signal.SIGTERM).name} at step {self.step}"
                    break
            if status == "completed":
                self.log.log_eval(self._eval_row())
            ckpt = self.save()
        finally:
            for s, handler in old_handlers.items():
                signal.signal(s, handler)
        summary = self._summary(status, reason, last)
        self.log.summary(summary)
        if status != "completed":
            self.log.note(f"{status}: {reason}; checkpoint saved to {ckpt}. "
                          f"Continue with: llmtrain run_dir={self.run_dir} resume=auto")
        elif t.sample_tokens:
            self.print_sample()
        self.log.close(summary)
        shutdown(self.env)
        return summary

    def _train_row(self, last: dict[str, Any], tokens_per_s: float, window_steps: int) -> dict[str, Any]:
        row = {"step": self.step, "loss": last["loss"], "lr": last["lr"], "grad_norm": last["grad_norm"],
               "tokens": self.tokens, "tokens_per_s": tokens_per_s, "peak_mem_bytes": peak_memory_bytes(self.env.device),
               "time_s": self.elapsed, "nonfinite_steps": self.nonfinite_total}
        sent = comm_bytes(self.model)  # counted only where a compression hook measures it (PowerSGD)
        if sent is not None:
            row["comm_bytes_per_step"] = sent / max(window_steps, 1)
        return row

    def _eval_row(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "time_s": self.elapsed, "val_loss": self.evaluate()}

    def _summary(self, status: str, reason: str, last: dict[str, Any]) -> dict[str, Any]:
        m = self.cfg.model
        vals = [r["val_loss"] for r in self.log.eval_rows if math.isfinite(r["val_loss"])]
        tokens_per_s = self.tokens / self.elapsed if self.elapsed > 0 else 0.0
        flops_per_token = 6 * self.params + 12 * m.n_layers * m.d_model * self.cfg.train.seq_len
        peak = peak_flops(self.env.device)  # None (mfu: null) on CPU and unknown GPUs
        opt_bytes = state_bytes(self.optimizer)
        return {
            "status": status, "reason": reason, "optimizer": self.cfg.optim.get("name"), "lr": self.cfg.optim.get("lr"),
            "steps": self.step, "tokens": self.tokens, "final_loss": last.get("loss"),
            "final_val_loss": self.log.eval_rows[-1]["val_loss"] if self.log.eval_rows else None,
            "best_val_loss": min(vals) if vals else None, "params": self.params,
            "optimizer_state_bytes": opt_bytes, "optimizer_state_bytes_per_param": opt_bytes / max(1, self.params),
            "tokens_per_s": tokens_per_s, "peak_mem_bytes": peak_memory_bytes(self.env.device),
            "wall_time_s": self.elapsed, "nonfinite_steps": self.nonfinite_total,
            "mfu": flops_per_token * tokens_per_s / (peak * self.env.world_size) if peak else None,
            "world_size": self.env.world_size, "strategy": self.env.strategy, "precision": str(self.dtype).replace("torch.", ""),
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
