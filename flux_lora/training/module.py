"""The Lightning module: a frozen FLUX DiT (fp8 or float) with peft LoRA adapters, trained by flow matching.

The module holds only the DiT; batches arrive with cached latents and text embeddings, so no encoder runs in a
step. The DiT is built in ``configure_model`` (after the data module has filled the cache and released the
encoders), and checkpoints hold only what is trained: adapters, optimizer, schedulers, step, RNG states.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor

from flux_lora.config import PreservationConfig, TrainConfig
from flux_lora.inference.offload import Transfer
from flux_lora.lora.patches import ModuleChange
from flux_lora.lora.peft_adapters import (
    AdapterWeights,
    LoraConfig,
    adapter_state_dict,
    adapters_disabled,
    clean_name,
    inject_lora,
    load_adapter_weights,
    set_input_casting,
    trainable_parameters,
)
from flux_lora.model.flux import Flux, FluxParams
from flux_lora.model.fp8 import set_fp8_matmul
from flux_lora.model.text_encoders import TextEmbeddings
from flux_lora.training.block_swap import BlockSwap
from flux_lora.training.block_wrappers import compile_blocks, enable_gradient_checkpointing
from flux_lora.training.loss import OutputPreservation, flow_matching_loss
from flux_lora.training.optimizers import build_optimizer
from flux_lora.training.resume import settle_loop_state
from flux_lora.training.schedules import build_scheduler

if TYPE_CHECKING:
    from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig

log = logging.getLogger(__name__)


class FluxLoraModule(L.LightningModule):
    """Flow-matching LoRA training of a frozen FLUX DiT.

    Args:
        load_model: builds the frozen (optionally fp8) DiT; called once, in ``configure_model``.
        lora: what to train.
        train: objective and optimizer settings.
        empty_embedding: the empty-caption embedding (``txt [1, L, D]``, ``y [1, D]``) for caption dropout; by
            default taken from the trainer's data module (``empty_embedding()``) when dropout is on.
        initial_lora: reads LoRA weights to start from, given the model's params (continued training).
        gradient_checkpointing, selective_checkpointing, compile, fp8_matmul: memory and speed options applied
            to the blocks (see :mod:`flux_lora.training.speed`).
        preservation: output preservation; its prompts' embeddings are ``preservation_embedding`` or, by default,
            taken from the trainer's data module (``sample_embeddings(prompts)``: cached like captions).
    """

    def __init__(
        self,
        load_model: Callable[[torch.device], Flux],
        lora: LoraConfig,
        train: TrainConfig,
        empty_embedding: TextEmbeddings | None = None,
        initial_lora: Callable[[FluxParams], Mapping[str, ModuleChange]] | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        selective_checkpointing: bool = False,
        fp8_matmul: bool = False,
        blocks_to_swap: int = 0,
        preservation: PreservationConfig | None = None,
        preservation_embedding: TextEmbeddings | None = None,
    ):
        super().__init__()
        self.preservation_cfg = preservation if preservation is not None and preservation.enabled else None
        self.preservation_embedding = preservation_embedding
        # preservation.replace_word: each caption's preservation prompts' embeddings (txt [L, D], y [D]), by text
        self.caption_preservation: dict[str, tuple[Tensor, Tensor]] = {}
        self.load_model = load_model
        self.initial_lora = initial_lora
        self.lora_cfg = lora
        self.train_cfg = train
        self.empty_embedding = empty_embedding
        self.gradient_checkpointing = gradient_checkpointing
        self.use_compile = compile
        self.selective_checkpointing = selective_checkpointing
        self.fp8_matmul = fp8_matmul
        self.blocks_to_swap = blocks_to_swap
        self.block_swap: BlockSwap | None = None
        self.dit: Flux | None = None
        self.strict_loading = False  # checkpoints hold only the adapters, not the frozen base

    def configure_model(self) -> None:
        if self.dit is not None:
            return
        dit = self.load_model(self.device if self._trainer is None else self.trainer.strategy.root_device)
        inject_lora(dit, self.lora_cfg)
        if self.initial_lora is not None:
            load_adapter_weights(dit, self.initial_lora(dit.params))
        if self.fp8_matmul:
            set_fp8_matmul(dit)
        if self._trainer is not None and self.trainer.precision in ("bf16-mixed", "16-mixed"):
            set_input_casting(dit, False)  # autocast casts the LoRA matmuls itself: bit-identical, less traffic
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(dit, selective=self.selective_checkpointing)
        if self.use_compile:
            compile_blocks(dit)
        self.dit = dit.train()  # loaders return eval mode; LoRA dropout needs train mode
        # DDP must not broadcast the frozen base: every rank loaded it already (~12 GB at full size), and gloo
        # cannot broadcast float8 at all ("Invalid scalar type")
        self._ddp_params_and_buffers_to_ignore = [n for n, p in self.named_parameters() if not p.requires_grad] + [
            n for n, _ in self.named_buffers()
        ]

    def on_train_start(self) -> None:
        # after Lightning moved the module to the device (which would undo the swap if done in configure_model)
        if self.blocks_to_swap and self.block_swap is None and self.dit is not None:
            self.block_swap = BlockSwap(self.dit, Transfer(self.device), self.blocks_to_swap)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.block_swap is not None:
            self.block_swap.release()  # the last block recomputed in backward goes back too

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.train_cfg.caption_dropout > 0 and self.empty_embedding is None and datamodule is not None:
            self.empty_embedding = datamodule.empty_embedding()
        pres = self.preservation_cfg
        if pres and pres.per_caption and not self.caption_preservation and datamodule is not None:
            texts = list(dict.fromkeys(t for c in datamodule.plan.captions for t in pres.caption_prompts(c)))
            emb = datamodule.sample_embeddings(texts)  # kept on the host; a step's rows go to the device
            self.caption_preservation = {t: (emb.txt[i], emb.y[i]) for i, t in enumerate(texts)}
        elif pres and not pres.per_caption and self.preservation_embedding is None and datamodule is not None:
            self.preservation_embedding = datamodule.sample_embeddings(pres.prompts)

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        """The flow-matching loss of ``batch`` (see :func:`flux_lora.training.loss.flow_matching_loss`), with the
        output-preservation loss when that is on."""
        device = batch["latents"].device
        empty = self._empty_embedding_on(device)
        pres = self._preservation_on(device, batch.get("caption"))
        assert self.dit is not None, "configure_model() builds the DiT first"
        return flow_matching_loss(self.dit, batch, self.train_cfg, generator, empty, pres)

    def _caption_prompts(self, captions: list[str], device: torch.device) -> tuple[TextEmbeddings, int]:
        """The embeddings of each caption's preservation prompts, sample by sample (``[B * K, ...]``), and K."""
        assert self.preservation_cfg is not None
        rows = [t for c in captions for t in self.preservation_cfg.caption_prompts(c)]
        count = len(self.preservation_cfg.replacements) or 1
        if len(rows) != count * len(captions):
            missing = [c for c in captions if not self.preservation_cfg.caption_prompts(c)]
            raise ValueError(
                f"preservation.replace_word {self.preservation_cfg.replace_word!r} is not in the captions {missing[:3]}"
            )
        txt = torch.stack([self.caption_preservation[t][0] for t in rows]).to(device, non_blocking=True)
        y = torch.stack([self.caption_preservation[t][1] for t in rows]).to(device, non_blocking=True)
        return TextEmbeddings(txt, y), count

    def _preservation_on(self, device: torch.device, captions: Any = None) -> OutputPreservation | None:
        if self.preservation_cfg is None:
            return None
        dit = self.dit
        if dit is None:
            raise RuntimeError("configure_model() builds the DiT first")
        weight = self.preservation_cfg.output_weight
        if self.preservation_cfg.per_caption:
            if not isinstance(captions, list) or not self.caption_preservation:
                raise ValueError("preservation.replace_word needs the batch's captions and their cached variants")
            emb, count = self._caption_prompts(captions, device)
            return OutputPreservation(emb, weight, lambda: adapters_disabled(dit), per_sample=count)
        if self.preservation_embedding is None:
            raise ValueError("preservation.output_weight > 0 needs the cached embeddings of preservation.prompts")
        if self.preservation_embedding.txt.device != device:  # moved once, not every step
            self.preservation_embedding = self.preservation_embedding.to(device=device)
        return OutputPreservation(self.preservation_embedding, weight, lambda: adapters_disabled(dit))

    def _empty_embedding_on(self, device: torch.device) -> TextEmbeddings | None:
        if self.empty_embedding is not None and self.empty_embedding.txt.device != device:  # moved once, not every step
            self.empty_embedding = self.empty_embedding.to(device=device)
        return self.empty_embedding

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """Noise, times and caption dropout of a micro-batch depend only on (seed, epoch, its place in the epoch's
        global batch list), so a resumed run draws exactly what an uninterrupted one would, and a run on W ranks
        what one process accumulating W micro-batches per step draws (rank r's batch b is global batch b W + r)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        key = (self.train_cfg.seed, self.current_epoch, batch_idx * world + self.global_rank, 0)
        return torch.Generator().manual_seed(hash(key) % (2**63))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self(batch, self.step_generator(batch_idx))
        self.log(
            "train/loss", loss, batch_size=len(batch["latents"])
        )  # no prog_bar: Lightning would read it every step
        self.log("train/lr", cast(LightningOptimizer, self.optimizers()).param_groups[0]["lr"], prog_bar=False)
        if torch.cuda.is_available() and self.device.type == "cuda":
            self.log("train/peak_memory_gb", torch.cuda.max_memory_allocated(self.device) / 2**30)
        return loss

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        cfg = self.train_cfg
        assert self.dit is not None, "configure_model() builds the DiT first"
        params = trainable_parameters(self.dit)
        optimizer = build_optimizer(cfg, params)
        scheduler = build_scheduler(cfg, optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lora_weights(self) -> AdapterWeights:
        """The trained adapters (LoRA, or DoRA / LoHa / LoKr patches) as :func:`write_lora` takes them."""
        assert self.dit is not None, "configure_model() builds the DiT first"
        return adapter_state_dict(self.dit)

    def _trainable_keys(self) -> set[str]:
        # state-dict names: the checkpoint wrappers' prefix is not part of them
        return {clean_name(n) for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["rng_states"] = {"per_rank": _gather_rng_states()}
        settle_loop_state(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        settle_loop_state(checkpoint)  # before Lightning restores the loops from it
        trainable = self._trainable_keys()
        missing = trainable - set(checkpoint["state_dict"])
        if missing:
            raise ValueError(
                f"checkpoint lacks adapter weights {sorted(missing)[:3]}: it was made with other "
                "lora settings (rank, targets) than this run's"
            )
        rng = checkpoint.get("rng_states")
        if rng:
            per_rank = rng.get("per_rank", [rng])  # checkpoints from before per-rank states hold one
            _set_rng_state(per_rank[self.global_rank] if self.global_rank < len(per_rank) else per_rank[0])


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, by rank (LoRA dropout draws differ per rank, so each must get its own back)."""
    state = _rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
