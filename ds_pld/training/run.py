"""Everything `launch/train.py` needs, so its loop fits on one screen: data, model, engine, resume, one training
step, validation, checkpoints, EarlyBERT's draw, metrics and tracking."""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed import comm as dist

import ds_pld
from ds_pld.config import DsPldConfig
from ds_pld.config_errors import ConfigError
from ds_pld.data import MLMMasker, StepBatches, check_seq_length, load_pretraining_data, prepare_dataset
from ds_pld.earlybert import EarlyBird, prune_model, validate_for_model
from ds_pld.engine import DsPldEngine, read_checkpoint_meta
from ds_pld.models import BertForPreTraining, build_bert_config
from ds_pld.models.io import save_pretrained
from ds_pld.pld import expected_layers, theta_at
from ds_pld.training.metrics import MetricsFile, plot_metrics, read_metrics
from ds_pld.training.schedules import build_lr_scheduler
from ds_pld.training.tracking import WandbTracker

CHECKPOINT_DIR = "checkpoints"
EARLYBERT_STATE = "earlybert"


def resolve_batch_sizes(ds_config: dict[str, Any], world_size: int) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps), checked against the world size before DeepSpeed sees
    the config; the resolved triple is written back so DeepSpeed agrees."""
    total = ds_config.get("train_batch_size")
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    accum = ds_config.get("gradient_accumulation_steps")
    for key, value in (("train_batch_size", total), ("train_micro_batch_size_per_gpu", micro),
                       ("gradient_accumulation_steps", accum)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"'{key}' = {value!r} must be a positive integer")
    if micro is None and accum is None:
        if total is None:
            raise ConfigError("the config sets none of 'train_batch_size', 'train_micro_batch_size_per_gpu'")
        accum = 1
    if micro is None:
        micro, rest = divmod(total, accum * world_size)
        if rest or micro < 1:
            raise ConfigError(f"'train_batch_size' = {total} cannot be split over {world_size} rank(s) x "
                              f"'gradient_accumulation_steps' = {accum}")
    if accum is None:
        accum = 1 if total is None else total // (micro * world_size)
        if total is not None and (accum < 1 or accum * micro * world_size != total):
            raise ConfigError(f"'train_batch_size' = {total} is not a multiple of 'train_micro_batch_size_per_gpu' "
                              f"= {micro} x {world_size} rank(s)")
    if total is not None and total != micro * accum * world_size:
        raise ConfigError(f"'train_batch_size' = {total} != 'train_micro_batch_size_per_gpu' {micro} x "
                          f"'gradient_accumulation_steps' {accum} x {world_size} rank(s)")
    ds_config.update(train_batch_size=micro * accum * world_size, train_micro_batch_size_per_gpu=micro,
                     gradient_accumulation_steps=accum)
    return micro, accum


NO_DECAY = ("bias", "norm", "_coef")


def parameter_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """BERT recipes exempt biases, LayerNorm weights (and slimming coefficients) from weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if any(part in name for part in NO_DECAY) else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def derived_seed(*parts: int) -> int:
    """A seed that depends only on its parts (position in training), so a resumed run draws the same numbers."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def full_fp32_state_dict(engine: DsPldEngine) -> dict[str, torch.Tensor]:
    """The model's weights as the optimizer holds them (fp32 masters, gathered under ZeRO-3), on the CPU."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in engine.module.named_parameters():
        master = safe_get_full_fp32_param(param) if engine.zero_optimization_stage() or engine.bfloat16_enabled() \
            else None
        state[name] = (param if master is None else master).detach().float().cpu().clone()
    return state


class PretrainingRun:
    """One pretraining job on this rank. Build with `PretrainingRun.create(config, output_dir, resume)`."""

    def __init__(self, config: DsPldConfig, output_dir: Path, resume: bool):
        self.config = config
        self.output_dir = output_dir
        self.checkpoint_dir = output_dir / CHECKPOINT_DIR
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.max_steps = config.training.max_steps
        self.seed = config.training.seed
        self.ds_config = dict(config.deepspeed)
        self.micro_batch, self.accumulation = resolve_batch_sizes(self.ds_config, self.world_size)
        self.data = self._load_data()
        meta = read_checkpoint_meta(self.checkpoint_dir) if resume else None
        self.resumed_from = None if meta is None else int(meta["global_steps"])
        model_config = self._model_config(meta)
        self.bird = EarlyBird(config.earlybert) if config.earlybert is not None else None
        if self.bird is not None:
            validate_for_model(config.earlybert, model_config)
        torch.manual_seed(self.seed)
        self.engine = self._build_engine(BertForPreTraining(model_config))
        if meta is not None:
            self.engine.load_checkpoint(str(self.checkpoint_dir))
        self.batches = StepBatches(self.data.train, self.micro_batch, self.accumulation, self.world_size, self.rank,
                                   self.seed)
        self.masker = MLMMasker(self.data.tokenizer, config.data.mlm_probability)
        self.metrics = MetricsFile(output_dir / "metrics.jsonl", self.resumed_from) if self.rank == 0 else None
        self.tracker = WandbTracker(config.wandb, output_dir, self.rank, self._run_summary(), resume)
        if self.metrics is not None and self.resumed_from is not None:
            self.tracker.replay(read_metrics(self.metrics.path), self.resumed_from)

    # --- construction -----------------------------------------------------------------------------------------------

    def _load_data(self):
        data = self.config.data
        path = Path(data.path) if data.path else self.output_dir / "data"
        if not data.path and self.rank == 0:
            prepare_dataset(path, corpus_files=list(data.corpus) or None, tokenizer=data.tokenizer,
                            max_seq_length=data.max_seq_length, vocab_size=data.vocab_size,
                            validation_fraction=data.validation_fraction, seed=self.seed)
        dist.barrier()
        loaded = load_pretraining_data(path)
        if self.rank == 0:
            loaded.tokenizer.save_pretrained(str(self.output_dir / "tokenizer"))
        return loaded

    def _model_config(self, meta: dict | None):
        """The checkpoint's model config when resuming (it may be EarlyBERT-pruned), else the config's."""
        if meta is not None:
            return build_bert_config(meta["model_config"])
        spec = self.config.model or build_bert_config("bert-base")
        tokenizer = self.data.tokenizer
        overrides: dict[str, Any] = {"vocab_size": self.data.vocab_size, "pad_token_id": tokenizer.pad_token_id}
        if self.config.earlybert is not None:
            overrides["slimming"] = True
        model_config = spec.with_updates(**overrides)
        check_seq_length(self.data.max_seq_length, model_config.max_position_embeddings)
        return model_config

    def _build_engine(self, model: BertForPreTraining, start_step: int = 0) -> DsPldEngine:
        schedule = self.config.lr_schedule
        scheduler = None if schedule is None else (
            lambda optimizer: build_lr_scheduler(optimizer, schedule, self.max_steps, start_step))
        config = dataclasses.replace(self.config, deepspeed=self.ds_config)
        optimizer_type = str((self.ds_config.get("optimizer") or {}).get("type", "")).lower()
        groups = None if optimizer_type in ("", "lamb") else parameter_groups(model)
        engine, *_ = ds_pld.initialize(model=model, model_parameters=groups, config=config, lr_scheduler=scheduler)
        if self.bird is not None and model.config.slimming:
            engine.extra_state[EARLYBERT_STATE] = self.bird
        engine.checkpoint_meta["seed"] = self.seed
        return engine

    def _run_summary(self) -> dict[str, Any]:
        return {"model": self.engine.module.config.to_dict(), "deepspeed": self.ds_config,
                "world_size": self.world_size,
                "pld": dataclasses.asdict(self.config.pld), "seed": self.seed, "max_steps": self.max_steps,
                "earlybert": None if self.config.earlybert is None else dataclasses.asdict(self.config.earlybert)}

    # --- training ---------------------------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self.engine.global_steps

    @property
    def searching(self) -> bool:
        return self.bird is not None and self.engine.module.config.slimming

    def _batch(self, rows: torch.Tensor, mask_seed: int) -> dict[str, torch.Tensor]:
        batch = self.masker(rows, seed=mask_seed)
        if bool(batch["attention_mask"].all()):
            del batch["attention_mask"]  # packed sequences: no mask lets SDPA pick its fastest kernel
        return {key: value.to(self.engine.device) for key, value in batch.items()}

    def train_step(self, stop_requested: bool = False) -> tuple[dict[str, Any], bool]:
        """One optimizer step over all micro-batches; returns the metrics record and whether any rank asked to stop
        (decided together, so every rank stops at the same step)."""
        engine, step = self.engine, self.step
        theta = engine.get_pld_theta()
        started = time.perf_counter()
        engine.module.train()
        loss_sum = torch.zeros((), device=engine.device)  # summed on the device: no sync per micro-batch
        layers_run = 0
        for micro in range(self.accumulation):
            torch.manual_seed(derived_seed(self.seed, step, micro, self.rank))  # dropout, as a function of position
            batch = self._batch(self.batches.examples(step, micro), self.batches.mask_seed(step, micro))
            out = engine(**batch)
            loss = out.loss + self.bird.penalty(engine.module) if self.searching else out.loss
            engine.backward(loss)
            engine.step()
            loss_sum += out.loss.detach().float()
            layers_run += out.layers_run
        shared = torch.stack([loss_sum / self.accumulation, torch.tensor(float(stop_requested), device=engine.device)])
        dist.all_reduce(shared)
        elapsed = time.perf_counter() - started
        samples = self.micro_batch * self.accumulation * self.world_size
        num_layers = engine.module.config.num_layers
        record: dict[str, Any] = {
            "step": self.step, "loss": float(shared[0]) / self.world_size, "lr": float(engine.get_lr()[0]),
            "pld_theta": theta, "expected_layers": expected_layers(theta if theta is not None else 1.0, num_layers),
            "layers_run": layers_run / self.accumulation, "samples_per_sec": samples / elapsed,
            "tokens_per_sec": samples * self.data.max_seq_length / elapsed, "step_time": elapsed,
            "epoch": self.batches.epoch(step),
        }
        record.update(self._optimizer_stats())
        if self.searching:
            record.update(self._earlybert_step())
        return record, float(shared[1]) > 0

    def _optimizer_stats(self) -> dict[str, float]:
        for optimizer in (self.engine.optimizer, getattr(self.engine.optimizer, "optimizer", None)):
            stats = getattr(optimizer, "trust_ratio_stats", None)
            if stats:
                return {f"trust_ratio_{key}": float(value) for key, value in stats.items()}
        return {}

    def _earlybert_step(self) -> dict[str, Any]:
        """Watch the masks; draw the ticket when they settle: prune for real and rebuild the engine, same step."""
        distance = self.bird.observe(self.step, self.engine.module)
        record: dict[str, Any] = {} if distance is None else {"earlybert_distance": distance}
        if self.bird.should_draw(self.step):
            ticket = self.bird.draw(self.step, self.engine.module)
            rewind = self.output_dir / "earlybert_rewind.pt"
            weights = torch.load(rewind, weights_only=True) if self.config.earlybert.rewind else \
                full_fp32_state_dict(self.engine)
            slim = prune_model(self.engine.module, ticket, weights).float()
            step, samples = self.engine.global_steps, self.engine.global_samples
            self.engine.destroy()
            self.engine = self._build_engine(slim, start_step=step)
            self.engine.set_progress(step, samples)
            record.update(earlybert_drawn_step=step, earlybert_heads=sum(slim.config.layer_heads),
                          earlybert_ffn=sum(slim.config.layer_intermediate))
        return record

    def save_rewind_point(self) -> None:
        """EarlyBERT's rewind target: the weights before the search (written once, by rank 0)."""
        path = self.output_dir / "earlybert_rewind.pt"
        if self.searching and self.config.earlybert.rewind and not path.exists():
            weights = full_fp32_state_dict(self.engine)
            if self.rank == 0:
                torch.save(weights, path.with_suffix(".tmp"))
                path.with_suffix(".tmp").replace(path)
        dist.barrier()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """MLM loss and accuracy on a fixed slice of the validation split with fixed masks (comparable over time)."""
        engine = self.engine
        engine.module.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        validation = self.data.validation
        for index in range(self.config.training.eval_batches):
            start = (index * self.world_size + self.rank) * self.micro_batch
            rows = torch.stack([validation[(start + i) % len(validation)]["input_ids"]
                                for i in range(self.micro_batch)])
            out = engine(**self._batch(rows.long(), derived_seed(self.seed, 7919, index, self.rank)))
            count = out.masked_labels.numel()
            totals += torch.tensor([out.loss.double().item() * count,
                                    (out.logits.argmax(-1) == out.masked_labels).sum().item(), count],
                                   dtype=torch.float64)
        totals = totals.to(engine.device)
        dist.all_reduce(totals)
        engine.module.train()
        return {"val_loss": float(totals[0] / totals[2].clamp(min=1)),
                "val_accuracy": float(totals[1] / totals[2].clamp(min=1))}

    # --- outputs ----------------------------------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)
        self.tracker.log(record, step=record["step"])

    def save_checkpoint(self) -> None:
        self.engine.save_checkpoint(str(self.checkpoint_dir))

    def finish(self) -> Path | None:
        """Write the final model folder (model + tokenizer) and the curves PNG; close the trackers."""
        final = self.output_dir / "final"
        weights = full_fp32_state_dict(self.engine)
        if self.rank == 0:
            model = BertForPreTraining(self.engine.module.config)
            model.load_state_dict(weights)
            tmp = self.output_dir / "final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_pretrained(model, tmp, self.data.tokenizer)
            shutil.rmtree(final, ignore_errors=True)
            tmp.replace(final)
            self.metrics.close()
            plot_metrics(self.output_dir / "metrics.jsonl", self.output_dir / "curves.png")
            (self.output_dir / "summary.json").write_text(json.dumps(
                {"steps": self.step, "final_dir": str(final), "theta": self.engine.get_pld_theta(),
                 "theta_expected": None if not self.config.pld.enabled else
                 theta_at(self.step, self.config.pld.theta, self.config.pld.gamma)}, indent=2))
        self.tracker.finish()
        dist.barrier()
        return final if self.rank == 0 else None


def build_run(config: DsPldConfig, output_dir: str | Path, resume: bool) -> PretrainingRun:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return PretrainingRun(config, output_dir, resume)

