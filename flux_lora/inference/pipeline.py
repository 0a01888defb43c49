"""Text to image with FLUX.1: encode the prompts, draw noise, integrate the flow ODE with Euler steps, decode.

The schedule (FLUX's resolution-dependent shift for dev, linear for schnell) and the Euler step are the pure
functions of ``sampling.py`` that the trainer uses too; :func:`denoise` is a free function the trainer's
sample callback reuses with cached text embeddings. Noise is drawn on the CPU in float32, so a seed gives the
same image on any device. Shapes come from the autoencoder's downscale factor and latent channels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from PIL import Image
from torch import Tensor

from flux_lora.dtypes import Quantize, float_dtype
from flux_lora.inference.control import (
    ControlNetProvider,
    ControlNetUnit,
    ImageInput,
    check_units,
    controlnet_components,
    encode_units,
    prepare_images,
)
from flux_lora.inference.denoise import ControlProvider, StepCallback, denoise
from flux_lora.inference.img2img import cut_schedule, image_latents, noised_start
from flux_lora.inference.kontext import ReferenceSize, reference_tokens
from flux_lora.inference.offload import OffloadMode, Placement, PlacementLog, Transfer
from flux_lora.inference.structure import check_structure, structure_latents
from flux_lora.model.autoencoder import AutoEncoder
from flux_lora.model.controlnet import FluxControlNet, check_compatible
from flux_lora.model.flux import Flux, FluxParams
from flux_lora.model.fp8 import QuantPolicy
from flux_lora.model.text_encoders import TextEmbeddings, TextEncoders
from flux_lora.sampling import get_schedule, image_seq_len, img_ids, latent_size, pack, txt_ids, unpack
from flux_lora.weights.controlnet_loading import load_controlnet
from flux_lora.weights.hub import resolve_model
from flux_lora.weights.loading import flux_params, load_autoencoder, load_flow_model

if TYPE_CHECKING:
    from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DEFAULT_GUIDANCE = 3.5
OutputType = Literal["pil", "latent", "pt"]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_pil(images: Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in [0, 1] -> RGB images (rounded to the nearest 8-bit value)."""
    arr = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


def model_folder(source: str | Path, option: str = "--model.source") -> Path:
    """A local model folder, or the folder a hub id downloads to (``hf:black-forest-labs/FLUX.1-dev``,
    ``AI-ModelScope/FLUX.1-dev``; see :func:`flux_lora.weights.hub.parse_source`). ``option`` is the command-line
    option an error's advice names."""
    path = resolve_model(source, ("dit", "ae", "text_encoders"), option=option)
    if not path.is_dir():
        raise ValueError(f"{source} is a file; pass a model folder (DiT, autoencoder and text encoders)")
    return path


def check_latent_channels(ae: AutoEncoder, params: FluxParams) -> None:
    """Raise ``ValueError`` unless the autoencoder's latents, packed 2x2, have the DiT's input width."""
    packed = ae.params.z_channels * 4
    if packed != params.in_channels:
        raise ValueError(
            f"the autoencoder's {ae.params.z_channels} latent channels pack to {packed}, "
            f"the DiT takes {params.in_channels}"
        )


class FluxPipeline:
    """Prompts to images with a FLUX.1 DiT, its autoencoder and its text encoders.

    ``device`` is where computation runs; ``offload`` (``None``, ``"model"``, ``"block"``) decides where the
    components wait in between (see :mod:`flux_lora.inference.offload`). ``text_encoders`` may be ``None`` when every
    call passes ``text_embeddings``.
    """

    def __init__(
        self,
        dit: Flux,
        ae: AutoEncoder,
        text_encoders: TextEncoders | None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        offload: OffloadMode | None = None,
    ):
        check_latent_channels(ae, dit.params)
        self.dit, self.ae, self.text_encoders = dit, ae, text_encoders
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or float_dtype(dit)
        self.placement: Placement  # set by enable_offload
        self.enable_offload(offload)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        *,
        quantize: Quantize | None = None,
        quant_policy: QuantPolicy = "blocks",
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device | None = None,
        offload: OffloadMode | None = None,
    ) -> FluxPipeline:
        """Load DiT, autoencoder and text encoders from a model folder (FLUX.1 layout) or a ModelScope id.

        ``quantize="float8_e4m3fn"`` stores the DiT's Linears chosen by ``quant_policy`` in fp8. With ``offload``,
        the weights load into host memory and move to ``device`` as the mode says.
        """
        folder = model_folder(source)
        device = torch.device(device) if device is not None else default_device()
        load_to = "cpu" if offload else device
        # the small autoencoder first, checked against the DiT's headers: a bad one fails before the big load
        ae = load_autoencoder(folder, dtype=dtype, device=load_to)
        check_latent_channels(ae, flux_params(folder))
        dit = load_flow_model(folder, dtype=dtype, device=load_to, quantize=quantize, quant_policy=quant_policy)
        text = TextEncoders.from_folder(folder, dit.params.max_sequence_length, dtype=dtype, device=load_to)
        return cls(dit, ae, text, device=device, dtype=dtype, offload=offload)

    def load_controlnet(self, source: str | Path, *, quantize: Quantize | None = None) -> FluxControlNet:
        """Load a ControlNet (folder or ModelScope id) in this pipeline's dtype, into host memory when
        offloading, else onto the device; use it in a :class:`~flux_lora.inference.control.ControlNetUnit`. Raises
        ``ValueError`` if it was built for another base model than this pipeline's DiT."""
        device = "cpu" if self.placement.mode else self.device
        controlnet = load_controlnet(source, dtype=self.dtype, device=device, quantize=quantize)
        check_compatible(controlnet, self.dit.params, f"ControlNet {source}")
        return controlnet

    def enable_offload(
        self, mode: OffloadMode | None, *, transfer: Transfer | None = None, on_move: PlacementLog | None = None
    ) -> None:
        """Switch memory mode (``None``, ``"model"``, ``"block"``); ``on_move`` records every move."""
        if hasattr(self, "placement"):
            self.placement.remove()
        parts = {"text_encoders": self.text_encoders, "dit": self.dit, "ae": self.ae}
        self.placement = Placement(
            {k: v for k, v in parts.items() if v is not None}, transfer or Transfer(self.device), mode, on_move=on_move
        )

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` rounded down to multiples of ``2 * downscale`` (16 for FLUX)."""
        ds = self.ae.params.downscale_factor
        lh, lw = latent_size(int(height), int(width), ds)
        if (lh * ds, lw * ds) != (height, width):
            log.warning(
                "image size %dx%d rounded down to %dx%d (multiples of %d)", width, height, lw * ds, lh * ds, 2 * ds
            )
        return lh * ds, lw * ds

    def timesteps(self, height: int, width: int, steps: int) -> list[float]:
        """The ``steps + 1`` sampling times for this image size (shifted for dev, linear for schnell)."""
        ds = self.ae.params.downscale_factor
        return get_schedule(steps, image_seq_len(*latent_size(height, width, ds)), shift=self.dit.params.shift_schedule)

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> TextEmbeddings:
        """Prompts -> :class:`TextEmbeddings` on the device in the compute dtype."""
        if self.text_encoders is None:
            raise ValueError("this pipeline has no text encoders: pass text_embeddings")
        with self.placement.use("text_encoders"):
            emb = self.text_encoders.encode(prompts)
        return emb.to(self.device, self.dtype)

    def noise(self, batch: int, latent_height: int, latent_width: int, generator: torch.Generator) -> Tensor:
        """``[B, C, h, w]`` float32 standard normal noise, drawn on the generator's device."""
        shape = (batch, self.ae.params.z_channels, latent_height, latent_width)
        return torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents ``[B, C, h, w]`` -> images ``[B, 3, H, W]`` in [0, 1], float32."""
        with self.placement.use("ae"):
            pixels = self.ae.decode(latents.to(self.device, float_dtype(self.ae)))
        return (pixels.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int | None = None,
        guidance: float | None = None,
        true_cfg: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        output_type: OutputType = "pil",
        progress: bool = True,
        text_embeddings: TextEmbeddings | None = None,
        negative_text_embeddings: TextEmbeddings | None = None,
        controlnets: Sequence[ControlNetUnit] = (),
        controls: ControlProvider | None = None,
        callback: StepCallback | None = None,
        image: ImageInput | None = None,
        strength: float = 1.0,
        control_image: ImageInput | None = None,
        reference_image: ImageInput | None = None,
        reference_size: ReferenceSize = "preferred",
    ) -> list[Image.Image] | Tensor:
        """Generate images.

        Args:
            prompt: one prompt or a list (or ``None`` with ``text_embeddings``, one row per prompt).
            height, width: rounded down to multiples of 16 (at least 16).
            num_inference_steps: default ``params.default_steps`` (4 for schnell).
            guidance: embedded guidance for dev (default 3.5, Kontext 2.5); schnell has none and ignores it with a
                warning.
            true_cfg: ``!= 1`` runs the DiT twice per step, ``v_neg + true_cfg * (v - v_neg)``, with
                ``negative_prompt`` (default the empty prompt) or ``negative_text_embeddings``.
            seed, generator: the noise source (a CPU generator seeded with ``seed``; random if neither).
            latents: initial noise ``[B, N, C]`` packed or ``[B, C, h, w]``, instead of drawing it.
            output_type: ``"pil"`` images, ``"pt"`` ``[B, 3, H, W]`` in [0, 1], ``"latent"`` ``[B, C, h, w]``
                scaled latents (what ``ae.decode`` takes).
            controlnets: ControlNets with their control images
                (see :class:`~flux_lora.inference.control.ControlNetUnit`),
                all checked before anything runs; a ControlNet that embeds guidance gets ``guidance`` (default
                3.5) even when the DiT has none.
            controls: per-DiT-call ControlNet residuals, instead of ``controlnets`` (for custom providers).
            image, strength: image to image (see :mod:`flux_lora.inference.img2img`): one image (PIL, or a
                tensor in [0, 1]) or one per prompt, resized to the output size; the run keeps the last
                ``steps - int(steps - steps * strength)`` steps (diffusers' rule) and starts from the image's
                latents noised to that time.
                Strength 1 gives the text-to-image result of the same seed, 0 the image's autoencoder round trip.
            control_image: structural conditioning (edges, depth, ...) for a DiT with a FLUX control LoRA applied
                (FLUX.1-Canny/Depth-dev-lora; see :mod:`flux_lora.inference.structure`): one image or one per
                prompt, at the output size; required exactly when the DiT's ``img_in`` is widened.
            reference_image: FLUX.1 Kontext's reference (see :mod:`flux_lora.inference.kontext`): one image or one
                per prompt, encoded at ``reference_size`` (``"preferred"``: the Kontext resolution nearest its
                aspect ratio, as BFL and diffusers do; ``"keep"``: its own size). On a Kontext model, ``image``
                without ``strength`` is the reference too, as in diffusers' ``FluxKontextPipeline``.
        """
        if output_type not in ("pil", "latent", "pt"):
            raise ValueError(f"output_type must be 'pil', 'latent' or 'pt', got {output_type!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        params = self.dit.params
        if params.kontext and image is not None and reference_image is None and strength == 1.0:
            image, reference_image = None, image  # diffusers' FluxKontextPipeline(image=reference)
        if reference_image is not None and (controlnets or controls is not None or control_image is not None):
            raise ValueError("a reference image (Kontext) cannot be combined with ControlNets or a control image")
        steps = params.default_steps if num_inference_steps is None else num_inference_steps
        check_structure(self.dit, control_image is not None)
        units = check_units(controlnets, params, self.dtype)
        if units and controls is not None:
            raise ValueError("pass controlnets or controls, not both")
        control_guidance = params.default_guidance if guidance is None else float(guidance)
        guidance = self._guidance(guidance, any(u.controlnet.params.trunk.guidance_embed for u in units))
        height, width = self.image_size(height, width)
        ds = self.ae.params.downscale_factor
        lh, lw = height // ds, width // ds
        schedule = self.timesteps(height, width, steps)  # validates steps before any encoding
        if image is not None:
            schedule = cut_schedule(schedule, strength)
        elif strength != 1.0:
            raise ValueError("strength is for image to image: pass an image too")

        cond, neg = self._conditioning(prompt, text_embeddings, negative_prompt, negative_text_embeddings, true_cfg)
        neg = None if neg is None else neg.repeat(num_images_per_prompt)
        num_prompts, cond = len(cond), cond.repeat(num_images_per_prompt)
        batch = len(cond)
        if units:
            runs = len(schedule) - 1  # the steps this call integrates (fewer for image to image)
            controls = self._control_provider(units, height, width, num_prompts, batch, runs, control_guidance)

        start = self._initial_noise(batch, lh, lw, seed, generator, latents)
        img_cond = reference = None
        ids = img_ids(batch, lh, lw, device=self.device)
        if image is not None or control_image is not None or reference_image is not None:  # the AE moves if needed
            with self.placement.use("ae"):
                ae_args = (self.ae, height, width, num_prompts)
                if image is not None:
                    x0 = image_latents(image, *ae_args, self.device, float_dtype(self.ae))
                    start = noised_start(x0, start, schedule[0])
                if control_image is not None:
                    img_cond = structure_latents(control_image, *ae_args, batch, self.device, float_dtype(self.ae))
                if reference_image is not None:
                    reference, ref_ids = reference_tokens(
                        reference_image, self.ae, num_prompts, batch, reference_size, self.device
                    )
                    ids = torch.cat([ids, ref_ids], dim=1)
        img = pack(start).to(self.device)
        tids = txt_ids(batch, cond.txt.shape[1], device=self.device)
        bar = _progress(len(schedule) - 1, progress)

        def on_step(i: int, t: float, x: Tensor) -> None:
            bar.update()
            if callback is not None:
                callback(i, t, x)

        joining = controlnet_components(units)
        try:
            with self.placement.joined(joining), self.placement.use("dit", *joining):
                img = denoise(
                    self.dit,
                    img,
                    ids,
                    cond.txt,
                    tids,
                    cond.y,
                    schedule,
                    guidance,
                    neg=neg,
                    true_cfg=true_cfg,
                    controls=controls,
                    callback=on_step,
                    img_cond=None if img_cond is None else img_cond.to(self.device),
                    reference=reference,
                )
        finally:
            bar.close()
        latents_out = unpack(img, lh, lw)
        _check_finite(latents_out, "the denoised latents")
        if output_type == "latent":
            return latents_out
        images = self.decode(latents_out)
        return images if output_type == "pt" else to_pil(images)

    def _control_provider(
        self,
        units: list[ControlNetUnit],
        height: int,
        width: int,
        num_prompts: int,
        batch: int,
        steps: int,
        guidance: float,
    ) -> ControlNetProvider:
        """Control images checked against the prompt count, then encoded by the autoencoder."""
        images = prepare_images(units, height, width, num_prompts)
        with self.placement.use("ae"):
            encoded = encode_units(units, images, self.ae, batch, self.device, float_dtype(self.ae))
        return ControlNetProvider(encoded, self.dit.params, steps, guidance)

    def _guidance(self, guidance: float | None, for_controlnets: bool = False) -> float | None:
        """The DiT's guidance (``None`` for schnell); checked too when only ControlNets embed it."""
        dev = self.dit.params.guidance_embed
        if not dev and guidance is not None and not for_controlnets:
            log.warning("this model (schnell-type) has no guidance embedding; guidance=%s is ignored", guidance)
        value = self.dit.params.default_guidance if guidance is None else float(guidance)
        if (dev or for_controlnets) and (math.isnan(value) or value < 0):
            raise ValueError(f"guidance must be a non-negative number, got {guidance}")
        return value if dev else None

    def _conditioning(
        self,
        prompt: str | list[str] | None,
        given: TextEmbeddings | None,
        negative_prompt: str | list[str] | None,
        negative_given: TextEmbeddings | None,
        true_cfg: float,
    ) -> tuple[TextEmbeddings, TextEmbeddings | None]:
        """``(prompt embeddings, negative embeddings or None)``; prompts and negatives encoded in one pass."""
        prompts = _prompt_list(prompt, given, "prompt")
        count = len(given) if given is not None else len(prompts or [])
        negatives = None
        if true_cfg == 1.0:
            if negative_prompt is not None or negative_given is not None:
                log.warning("a negative prompt takes effect only with true_cfg != 1; it is ignored")
            negative_given = None
        elif negative_given is None:
            negative_prompt = "" if negative_prompt is None else negative_prompt  # the unconditional prompt
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * count
            negatives = _prompt_list(negative_prompt, None, "negative_prompt")
        elif negative_prompt is not None:
            raise ValueError("pass either negative_prompt or its text embeddings, not both")
        encoded = self.encode((prompts or []) + (negatives or [])) if prompts or negatives else None
        if given is not None:
            cond = given.to(self.device, self.dtype)
        else:
            assert encoded is not None and prompts is not None  # _prompt_list gives prompts when no embeddings
            cond = encoded[: len(prompts)]
        neg = negative_given.to(self.device, self.dtype) if negative_given is not None else None
        if negatives is not None:
            assert encoded is not None
            neg = encoded[len(encoded) - len(negatives) :]
        if neg is not None and len(neg) != len(cond):
            raise ValueError(f"{len(neg)} negative prompts for {len(cond)} prompts")
        return cond, neg

    def _initial_noise(
        self, batch: int, lh: int, lw: int, seed: int | None, generator: torch.Generator | None, latents: Tensor | None
    ) -> Tensor:
        """``[B, C, h, w]`` float32 starting noise."""
        channels = self.ae.params.z_channels
        if latents is not None:
            if latents.ndim == 3:
                latents = unpack(latents, lh, lw)
            if tuple(latents.shape) != (batch, channels, lh, lw):
                raise ValueError(
                    f"latents have shape {tuple(latents.shape)}, expected "
                    f"{(batch, channels, lh, lw)} or packed "
                    f"{(batch, (lh // 2) * (lw // 2), 4 * channels)}"
                )
            _check_finite(latents, "the given latents")
            return latents.float()
        if generator is None:
            generator = torch.Generator("cpu")
            if seed is None:
                log.info("no seed given; drew seed %d", generator.seed())
            else:
                generator.manual_seed(int(seed))
        elif seed is not None:
            raise ValueError("pass seed or generator, not both")
        return self.noise(batch, lh, lw, generator)


def _check_finite(latents: Tensor, what: str) -> None:
    if not bool(torch.isfinite(latents).all()):
        raise ValueError(
            f"{what} hold NaN or Inf, so no image is made (a LoRA with huge values, or a model that overflows "
            "in this dtype?)"
        )


def _prompt_list(prompts: str | list[str] | None, given: TextEmbeddings | None, what: str) -> list[str] | None:
    if (prompts is None) == (given is None):
        raise ValueError(f"pass either {what} or its text embeddings, not both and not neither")
    if prompts is None:
        return None
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} must be a string or a non-empty list of strings, got {prompts!r}")
    return prompts


def _progress(total: int, enabled: bool) -> tqdm:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="denoising", unit="step", disable=not enabled)
