"""Write a complete tiny FLUX.1 model folder in the official layout, deterministic by seed.

    python -m flux_lora.weights.tiny OUTDIR [--variant dev|schnell|kontext] [--seed 0] [--no-controlnets]

The folder holds ``flux1-<variant>.safetensors`` (tiny DiT, BFL keys), ``ae.safetensors`` (tiny autoencoder),
``text_encoder/`` + ``tokenizer/`` (tiny CLIP) and ``text_encoder_2/`` + ``tokenizer_2/`` (tiny T5), saved with
transformers; the tokenizers are made offline from a built-in word list. Every loader runs on it unchanged.
The command also writes two tiny ControlNets in the diffusers layout: ``controlnet/``, ``controlnet-union/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flux_lora.atomic import move_folder_into_place, save_safetensors_atomic, temp_path, write_text_atomic
from flux_lora.model.autoencoder import AE_PRESETS, AutoEncoder, AutoEncoderParams
from flux_lora.model.controlnet import MASK_CHANNELS, PATCH_AREA, ControlNetParams, FluxControlNet
from flux_lora.model.flux import PRESETS, Flux, FluxParams
from flux_lora.weights.controlnet_loading import controlnet_config, controlnet_to_diffusers
from flux_lora.weights.loading import PARAMS_METADATA_KEY

log = logging.getLogger(__name__)

WORDS = """a an the of and with in on at to from by for is are photo picture painting drawing render image
portrait close up wide shot of style dog cat bird fish horse cow car bike boat plane house tree flower
mountain river lake sea sky cloud sun moon star city street road forest field garden beach desert snow rain
red orange yellow green blue purple pink white black gray brown gold silver bright dark light shadow small
big tall short old young happy sad smiling running sitting standing flying swimming sleeping looking
woman man girl boy child person people face eyes hair hat shirt dress coat glasses table chair window door
wall floor room kitchen book cup bottle lamp clock phone computer screen sign text letter word number
circle square triangle line dot stripe pattern texture wood stone metal glass paper cloth water fire
morning evening night sunset sunrise summer winter spring autumn soft sharp blurry detailed simple
sks ohwx token trigger concept subject background foreground center left right top bottom cinematic
realistic anime cartoon sketch watercolor oil pixel art studio lighting""".split()

DEFAULT_SEED = 0
PIECE_COST = 20.0  # per Unigram piece, more than any log-frequency of the corpus: fewest pieces first
TINY_UNION_MODES = 10  # as InstantX/FLUX.1-dev-Controlnet-Union-alpha


def _corpus() -> list[str]:
    lines = [" ".join(WORDS[i : i + 8]) for i in range(0, len(WORDS), 8)]
    return lines + [w.upper() for w in WORDS[:40]] + ["0 1 2 3 4 5 6 7 8 9 , . ! ? ' \" - : ;"]


def build_clip_tokenizer(out: Path) -> None:
    """A byte-level BPE with CLIP's start/end tokens (end token also pads), saved with ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[bos, eos],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=eos, model_max_length=77
    )
    fast.save_pretrained(out)


def unigram_vocab(corpus: list[str], size: int, longest: int = 8) -> list[tuple[str, float]]:
    """At most ``size`` pieces with their scores for a Unigram model, the same on every run: every character of
    the corpus's words (``▁``-prefixed, as Metaspace splits them), every whole word, then the most frequent
    substrings of up to ``longest`` characters. A piece scores its log-frequency less a fixed cost, so a word is
    cut into as few pieces as the vocabulary allows, the more frequent ones among equals. (tokenizers'
    ``UnigramTrainer`` is not deterministic: its ids and scores change from run to run, and with them every T5
    embedding of a model trained on its ids.)"""
    counts: Counter[str] = Counter()
    words: Counter[str] = Counter()
    for line in corpus:
        for word in line.split():
            piece = "\u2581" + word
            words[piece] += 1
            for i in range(len(piece)):
                for j in range(i + 1, min(len(piece), i + longest) + 1):
                    counts[piece[i:j]] += 1
    counts.update({w: n for w, n in words.items() if len(w) > longest})  # whole words longer than that
    by_count = sorted(counts, key=lambda p: (-counts[p], p))
    ranked = sorted(p for p in counts if len(p) == 1) + sorted(words, key=lambda p: (-words[p], p)) + by_count
    pieces = list(dict.fromkeys(ranked))[:size]
    total = sum(counts[p] for p in pieces)
    return [(p, math.log(counts[p] / total) - PIECE_COST) for p in pieces]


def build_t5_tokenizer(out: Path, max_length: int) -> None:
    """A Unigram with a Metaspace pre-tokenizer and ``</s>`` appended, like T5's SentencePiece tokenizer; its
    vocabulary from :func:`unigram_vocab`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pad, eos, unk = "<pad>", "</s>", "<unk>"
    specials = [(pad, 0.0), (eos, 0.0), (unk, 0.0)]
    tok = Tokenizer(models.Unigram(specials + unigram_vocab(_corpus(), 600 - len(specials)), unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens([pad, eos, unk])
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, tok.token_to_id(eos))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, eos_token=eos, unk_token=unk, model_max_length=max_length
    )
    fast.save_pretrained(out)


# CLIP-L's and T5-XXL's real layer shapes, for full-width (but shallow) random encoders
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, relative_attention_num_buckets=32)


def _clip_shapes(params: FluxParams, vocab: int, full_width: bool) -> dict[str, Any]:
    if full_width:
        return CLIP_L
    d = params.vec_in_dim
    return dict(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_attention_heads=2, projection_dim=d)


def _t5_shapes(params: FluxParams, vocab: int, full_width: bool) -> dict[str, Any]:
    if full_width:
        return T5_XXL
    d = params.context_in_dim
    return dict(vocab_size=vocab, d_model=d, d_kv=8, d_ff=2 * d, num_heads=4, relative_attention_num_buckets=8)


def build_text_encoders(out: Path, params: FluxParams, seed: int, full_width: bool = False, t5_layers: int = 2) -> None:
    """Tokenizers and random CLIP + T5 encoders: tiny ones of the DiT's text widths, or with ``full_width`` the
    real CLIP-L and T5-XXL layer shapes (vocabularies included) with 2 CLIP and ``t5_layers`` T5 layers, stored
    in bf16 and built in bf16 (one T5-XXL layer is 0.39 GB there)."""
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    build_clip_tokenizer(out / "tokenizer")
    build_t5_tokenizer(out / "tokenizer_2", params.max_sequence_length)
    clip_tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    t5_tok = AutoTokenizer.from_pretrained(out / "tokenizer_2")
    dtype = torch.bfloat16 if full_width else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed + 1)
        clip_cfg = CLIPTextConfig(
            **_clip_shapes(params, len(clip_tok), full_width),
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
        CLIPTextModel(clip_cfg).eval().save_pretrained(out / "text_encoder", safe_serialization=True)

        torch.manual_seed(seed + 2)
        t5_cfg = T5Config(
            **_t5_shapes(params, len(t5_tok), full_width),
            num_layers=t5_layers,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,  # type: ignore[call-arg]  # T5Config keeps it; its signature omits it
        )
        T5EncoderModel(t5_cfg).eval().save_pretrained(out / "text_encoder_2", safe_serialization=True)
    finally:
        torch.set_default_dtype(default)


def random_flux(params: FluxParams, seed: int) -> Flux:
    """A DiT with random weights; the modulation and final layers are not zero, so every path matters."""
    torch.manual_seed(seed)
    model = Flux(params)
    for name, p in model.named_parameters():
        if name.endswith("scale"):  # RMSNorm scales: around 1
            nn.init.uniform_(p, 0.5, 1.5)
    return model


def random_autoencoder(params: AutoEncoderParams, seed: int) -> AutoEncoder:
    torch.manual_seed(seed + 3)
    ae = AutoEncoder(params)
    for m in ae.modules():
        if isinstance(m, nn.GroupNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return ae


def write_autoencoder(path: Path, params: AutoEncoderParams, seed: int) -> Path:
    """A random autoencoder as ``ae.safetensors`` (float32, as the official file), its params in the metadata."""
    ae = random_autoencoder(params, seed)
    metadata = {PARAMS_METADATA_KEY: json.dumps(params.to_dict()), "format": "pt"}
    return save_safetensors_atomic(ae.state_dict(), path, metadata)


TINY_PRESETS = {"dev": "tiny", "schnell": "tiny-schnell", "kontext": "tiny-kontext"}
DIT_FILES = {
    "dev": "flux1-dev.safetensors",
    "schnell": "flux1-schnell.safetensors",
    "kontext": "flux1-kontext-dev.safetensors",
}


def write_tiny_model(
    out: str | Path, variant: str = "dev", seed: int = DEFAULT_SEED, params: FluxParams | None = None
) -> Path:
    """Write the tiny model folder and return its path.

    The folder is written under a temporary name and renamed into place, so an interrupted write never leaves
    a partial model that later runs would take for a complete one. (Into an existing, non-empty folder, each
    file or subfolder is replaced atomically instead.) The global torch RNG is left as it was: a run that writes
    the model on first use draws what every later run of the same command draws."""
    if variant not in TINY_PRESETS:
        raise ValueError(f"variant must be one of {', '.join(TINY_PRESETS)}, got {variant!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)  # a whole folder, renamed into place when complete
    try:
        with torch.random.fork_rng(devices=[]):  # the weights are seeded: the caller's seed stays untouched
            _write_tiny_model(tmp, variant, seed, params)
        move_folder_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote tiny %s model to %s", variant, out)
    return out


def _write_tiny_model(out: Path, variant: str, seed: int, params: FluxParams | None) -> None:
    out.mkdir(parents=True)
    params = params or PRESETS[TINY_PRESETS[variant]]
    dit = random_flux(params, seed)
    save_safetensors_atomic(
        dit.state_dict(),
        out / DIT_FILES[variant],
        {PARAMS_METADATA_KEY: json.dumps(params.to_dict()), "format": "pt"},
    )
    write_autoencoder(out / "ae.safetensors", AE_PRESETS["tiny"], seed)
    build_text_encoders(out, params, seed)
    (out / "README.md").write_text(
        f"Tiny FLUX.1-{variant}-shaped model with random weights (seed {seed}), written by flux_lora.weights.tiny.\n"
        "For tests and offline demos only: it produces noise, not pictures.\n"
    )


def tiny_controlnet_params(
    flux: FluxParams | None = None, union: bool = False, inpainting: bool = False
) -> ControlNetParams:
    """A ControlNet for the tiny DiT, with fewer blocks than the DiT so the residual interval rule matters."""
    flux = flux or PRESETS["tiny"]
    double, single = flux.depth, flux.depth_single_blocks
    trunk = replace(
        flux,
        depth=double if union else max(1, double // 2),
        depth_single_blocks=max(1, single // 2) if union else single,
    )
    return ControlNetParams(
        trunk,
        extra_channels=MASK_CHANNELS * PATCH_AREA if inpainting else 0,
        num_modes=TINY_UNION_MODES if union else None,
    )


def random_controlnet(params: ControlNetParams, seed: int) -> FluxControlNet:
    """A ControlNet with random weights: unlike a fresh one (zero outputs by design), its output is not 0."""
    torch.manual_seed(seed + 4)
    model = FluxControlNet(params)
    for name, p in model.named_parameters():
        if name.endswith("scale"):
            nn.init.uniform_(p, 0.5, 1.5)
    for m in [model.control_in, *model.controlnet_blocks, *model.controlnet_single_blocks]:
        m.reset_parameters()
    return model


def write_tiny_controlnet(
    out: str | Path,
    union: bool = False,
    seed: int = DEFAULT_SEED,
    params: ControlNetParams | None = None,
    shards: int = 1,
) -> Path:
    """Write a tiny ControlNet folder in the diffusers layout (``config.json``, safetensors); return its path.

    ``params`` defaults to :func:`tiny_controlnet_params` (union or not); ``shards > 1`` writes an index and
    that many ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` files, as diffusers does for big models.
    """
    params = params or tiny_controlnet_params(union=union)
    if union != params.is_union:
        raise ValueError(f"union={union} contradicts params.num_modes={params.num_modes}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's RNG stays untouched
        sd = controlnet_to_diffusers(random_controlnet(params, seed).state_dict(), params)
    stem = "diffusion_pytorch_model"
    if shards <= 1:
        save_safetensors_atomic(sd, out / f"{stem}.safetensors", {"format": "pt"})
    else:
        keys = sorted(sd)
        weight_map = {}
        for i in range(shards):
            name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: sd[k] for k in keys[i::shards]}
            save_safetensors_atomic(part, out / name, {"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        index = json.dumps({"weight_map": weight_map}, indent=2)
        write_text_atomic(out / f"{stem}.safetensors.index.json", index)
    write_text_atomic(out / "config.json", json.dumps(controlnet_config(params), indent=2))
    log.info("wrote tiny %sControlNet to %s", "union " if params.is_union else "", out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--variant", choices=list(TINY_PRESETS), default="dev")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--no-controlnets", action="store_true", help="do not write controlnet/ and controlnet-union/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_tiny_model(args.outdir, args.variant, args.seed)
    if not args.no_controlnets:
        flux = PRESETS["tiny-schnell" if args.variant == "schnell" else "tiny"]
        for union, name in ((False, "controlnet"), (True, "controlnet-union")):
            write_tiny_controlnet(args.outdir / name, union, args.seed, tiny_controlnet_params(flux, union))


if __name__ == "__main__":
    main()
