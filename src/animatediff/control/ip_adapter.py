"""IP-Adapter for SD1.5: a reference image steers every frame through extra cross-attention.

Released files (h94/IP-Adapter `models/`): `ip-adapter_sd15` maps the image encoder's projected
embedding to 4 tokens (a linear layer and a LayerNorm); `ip-adapter-plus_sd15` and
`ip-adapter-plus-face_sd15` map its penultimate hidden states to 16 tokens (a Perceiver
resampler). Keys are `image_proj.*` and `ip_adapter.<n>.to_{k,v}_ip.weight`, `n` numbering the
UNet's attention processors in order, so the cross-attentions are 1, 3, 5, ... (`.bin` files
nest the two groups, safetensors files prefix them). The image encoder is a transformers
`CLIPVisionModelWithProjection` folder (ViT-H/14 for these files).

The computation is diffusers': the UNet projects `added_cond_kwargs["image_embeds"]` with its
`encoder_hid_proj` and every attn2 adds `scale * attention(q, to_k_ip(tokens), to_v_ip(tokens))`
(`IPAdapterAttnProcessor2_0`). Frames are folded into the batch, so the embeddings are given per
frame: `IPAdapterEmbeds.for_frames`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import (
    ImageProjection,
    IPAdapterPlusImageProjection,
    MultiIPAdapterImageProjection,
)
from PIL import Image
from torch import nn
from transformers import CLIPVisionModelWithProjection

from ..checkpoints.base import check_pickled_weights
from ..checkpoints.io import CheckpointError, check_keys, first_keys, load_state_dict
from ..motion.unet import MotionUNet

try:  # transformers >= 5: the PIL backend, the preprocessing the released encoder was used with
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
    from transformers import CLIPImageProcessor

__all__ = ["IPAdapter", "IPAdapterEmbeds", "load_ip_adapter", "load_image_encoder"]

PLAIN_TOKENS = 4  # ip-adapter_sd15's image tokens (diffusers assumes 4 as well)
DIM_HEAD = 64  # the head width of every released resampler
Scale = float | Mapping[str, object]
Images = torch.Tensor | Image.Image | Sequence[Image.Image]
# tencent-ailab `Resampler` names -> diffusers `IPAdapterPlusImageProjection` names.
_RESAMPLER_RENAMES = (
    (re.compile(r"^layers\.(\d+)\.0\.norm1\."), r"layers.\1.ln0."),
    (re.compile(r"^layers\.(\d+)\.0\.norm2\."), r"layers.\1.ln1."),
    (re.compile(r"^layers\.(\d+)\.0\.to_q\."), r"layers.\1.attn.to_q."),
    (re.compile(r"^layers\.(\d+)\.0\.to_out\."), r"layers.\1.attn.to_out.0."),
    (re.compile(r"^layers\.(\d+)\.1\.0\."), r"layers.\1.ff.0."),
    (re.compile(r"^layers\.(\d+)\.1\.1\."), r"layers.\1.ff.1.net.0.proj."),
    (re.compile(r"^layers\.(\d+)\.1\.3\."), r"layers.\1.ff.1.net.2."),
)
_RESAMPLER_KEYS = {
    "latents",
    "proj_in.weight",
    "proj_out.weight",
    "layers.0.0.to_q.weight",
    "layers.0.1.1.weight",
}
_TO_KV = re.compile(r"^layers\.(\d+)\.0\.to_kv\.weight$")
_LAYER = re.compile(r"^ip_adapter\.(\d+)\.")


# -- loading ---------------------------------------------------------------------------------
def load_image_encoder(
    encoder: str | Path | CLIPVisionModelWithProjection,
) -> CLIPVisionModelWithProjection:
    """A `CLIPVisionModelWithProjection` folder (h94/IP-Adapter `models/image_encoder`), in fp32."""
    if isinstance(encoder, CLIPVisionModelWithProjection):
        return encoder
    if not isinstance(encoder, str | Path):
        kind = type(encoder).__name__
        raise ValueError(
            f"image_encoder: expected a folder or a CLIPVisionModelWithProjection, got {kind}"
        )
    folder = Path(encoder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            folder,
            "not an image encoder folder (no config.json); expected a transformers "
            "CLIPVisionModelWithProjection folder such as h94/IP-Adapter models/image_encoder",
        )
    check_pickled_weights(folder)  # a .bin that would run code: refused before transformers
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise CheckpointError(
            folder, f"cannot load the image encoder: {str(e).splitlines()[0]}"
        ) from e
    return model.to(torch.float32).eval()


def load_ip_adapter(
    path: str | Path,
    image_encoder: str | Path | CLIPVisionModelWithProjection,
    unet: UNet2DConditionModel | MotionUNet,
) -> IPAdapter:
    """An SD1.5 IP-Adapter file (plain, plus or plus-face; `.bin` or `.safetensors`) with its
    image encoder, checked against `unet` and the encoder; `IPAdapter.attach` installs it."""
    sd = load_state_dict(path)
    image_proj, layers = _split(path, sd)
    variant = detect_variant(path, image_proj, layers)
    unet = _image_unet(unet)
    encoder = load_image_encoder(image_encoder)
    _check_encoder(path, variant, image_proj, encoder, image_encoder)
    projection = _build_projection(path, variant, image_proj, unet)
    names = cross_attention_names(unet)
    processors = _build_processors(path, layers, unet, names, _num_tokens(projection))
    return IPAdapter(Path(path), variant, projection, names, processors, encoder)


def _split(path, sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The `image_proj.` and `ip_adapter.` groups, prefixes removed from the first."""
    image_proj = {
        k.removeprefix("image_proj."): v for k, v in sd.items() if k.startswith("image_proj.")
    }
    layers = {k: v for k, v in sd.items() if k.startswith("ip_adapter.")}
    if not image_proj or not layers or len(image_proj) + len(layers) != len(sd):
        raise CheckpointError(
            path,
            "not an IP-Adapter: expected only image_proj.* and ip_adapter.* keys, "
            f"found {first_keys(sd)}",
        )
    return image_proj, layers


def detect_variant(
    path, image_proj: Mapping[str, torch.Tensor], layers: Mapping[str, torch.Tensor]
) -> str:
    """The variant: plain, plus or plus-face (the same resampler as plus, named by the file)."""
    unsupported = None
    if "perceiver_resampler.proj_in.weight" in image_proj:
        unsupported = "an IP-Adapter FaceID Plus"
    elif "proj.3.weight" in image_proj:
        unsupported = "an IP-Adapter full-face (ip-adapter-full-face)"
    elif "proj.0.weight" in image_proj or any("lora" in k for k in layers):
        unsupported = "an IP-Adapter FaceID"
    if unsupported:
        raise CheckpointError(
            path,
            f"{unsupported} file, which is not supported (supported: ip-adapter_sd15, "
            "ip-adapter-plus_sd15, ip-adapter-plus-face_sd15)",
        )
    if {"proj.weight", "norm.weight"} <= image_proj.keys():
        return "plain"
    if _RESAMPLER_KEYS <= image_proj.keys():
        return "plus-face" if "face" in Path(path).name.lower() else "plus"
    raise CheckpointError(
        path, f"unrecognised IP-Adapter image projection: image_proj keys {first_keys(image_proj)}"
    )


def cross_attention_names(unet: UNet2DConditionModel) -> list[str]:
    """The UNet's cross-attention processors, in the order the released files number them."""
    return [name for name in unet.attn_processors if not name.endswith("attn1.processor")]


def _image_unet(unet: UNet2DConditionModel | MotionUNet) -> UNet2DConditionModel:
    return unet.unet if isinstance(unet, MotionUNet) else unet


def _check_encoder(path, variant: str, image_proj: dict, encoder, source) -> None:
    """plain reads the encoder's projected embedding, plus its hidden states."""
    plain = variant == "plain"
    wanted = image_proj["proj.weight" if plain else "proj_in.weight"].shape[1]
    given = encoder.config.projection_dim if plain else encoder.config.hidden_size
    if wanted != given:
        what = "image embeddings" if plain else "image-encoder hidden states"
        name = source if isinstance(source, str | Path) else type(source).__name__
        raise CheckpointError(
            path,
            f"takes {wanted}-wide {what} but the image encoder {name} gives {given}-wide ones "
            "(the SD1.5 files need the ViT-H/14 encoder, h94/IP-Adapter models/image_encoder)",
        )


def _check_width(path, width: int, unet: UNet2DConditionModel) -> None:
    cross = unet.config.cross_attention_dim
    if width != cross:
        raise CheckpointError(
            path,
            f"its image tokens are {width} wide but this UNet's cross-attention takes {cross} "
            "(an IP-Adapter for another base model, e.g. SDXL?)",
        )


def _build_projection(
    path, variant: str, image_proj: dict, unet: UNet2DConditionModel
) -> nn.Module:
    if variant == "plain":
        width = image_proj["norm.weight"].shape[0]
        _check_width(path, width, unet)
        projection = ImageProjection(image_proj["proj.weight"].shape[1], width, PLAIN_TOKENS)
        sd = {
            k.replace("proj.", "image_embeds.", 1) if k.startswith("proj.") else k: v
            for k, v in image_proj.items()
        }
    else:
        _check_width(path, image_proj["proj_out.weight"].shape[0], unet)
        projection = _resampler(image_proj)
        sd = _resampler_state_dict(image_proj)
    check_keys(path, projection.state_dict(), sd, f"an IP-Adapter {variant} image projection")
    projection.load_state_dict(sd)
    return projection.eval()


def _resampler(image_proj: dict) -> IPAdapterPlusImageProjection:
    """The resampler the file's shapes describe."""
    latents = image_proj["latents"]
    hidden = latents.shape[2]
    depth = len({k.split(".")[1] for k in image_proj if k.startswith("layers.")})
    return IPAdapterPlusImageProjection(
        embed_dims=image_proj["proj_in.weight"].shape[1],
        output_dims=image_proj["proj_out.weight"].shape[0],
        hidden_dims=hidden,
        depth=depth,
        dim_head=DIM_HEAD,
        heads=image_proj["layers.0.0.to_q.weight"].shape[0] // DIM_HEAD,
        num_queries=latents.shape[1],
        ffn_ratio=image_proj["layers.0.1.1.weight"].shape[0] / hidden,
    )


def _resampler_state_dict(image_proj: dict) -> dict[str, torch.Tensor]:
    sd = {}
    for key, value in image_proj.items():
        if match := _TO_KV.match(key):  # one fused key/value projection -> to_k, to_v
            prefix = f"layers.{match[1]}.attn"
            sd[f"{prefix}.to_k.weight"], sd[f"{prefix}.to_v.weight"] = value.chunk(2, dim=0)
            continue
        for pattern, replacement in _RESAMPLER_RENAMES:
            key = pattern.sub(replacement, key)
        sd[key] = value
    return sd


def _num_tokens(projection: nn.Module) -> int:
    if isinstance(projection, ImageProjection):
        return projection.num_image_text_embeds
    return projection.latents.shape[1]


def _build_processors(
    path, layers: dict, unet: UNet2DConditionModel, names: list[str], tokens: int
) -> list[IPAdapterAttnProcessor2_0]:
    found = sorted({int(m[1]) for k in layers if (m := _LAYER.match(k))})
    if len(found) != len(names):
        raise CheckpointError(
            path,
            f"has {len(found)} cross-attention layers, this UNet has {len(names)} "
            "(an IP-Adapter for another base model, e.g. SDXL?)",
        )
    modules = [unet.get_submodule(name.removesuffix(".processor")) for name in names]
    expected = {}
    for i, attn in enumerate(modules):  # numbered like all processors: attn1 even, attn2 odd
        for proj in ("to_k_ip", "to_v_ip"):
            expected[f"ip_adapter.{2 * i + 1}.{proj}.weight"] = attn.to_k.weight.shape
    check_keys(path, expected, layers, "the cross-attention layers of this UNet")
    return [_processor(attn, layers, 2 * i + 1, tokens) for i, attn in enumerate(modules)]


def _processor(attn: Attention, layers: dict, n: int, tokens: int) -> IPAdapterAttnProcessor2_0:
    hidden, cross = attn.to_k.weight.shape
    processor = IPAdapterAttnProcessor2_0(hidden, cross, num_tokens=[tokens], scale=1.0)
    processor.load_state_dict(
        {
            "to_k_ip.0.weight": layers[f"ip_adapter.{n}.to_k_ip.weight"],
            "to_v_ip.0.weight": layers[f"ip_adapter.{n}.to_v_ip.weight"],
        }
    )
    return processor


# -- per-layer scales --------------------------------------------------------------------------
def layer_scales(names: list[str], scale: Scale) -> list[float]:
    """One scale per cross-attention processor. `scale` is a float, or per layer: processor-name
    prefixes (`{"up_blocks.1": 1.0}`) or diffusers' form (`{"down": {"block_2": [0.0, 1.0]},
    "up": {"block_0": [0.0, 1.0, 0.0]}, "mid": 0.0}`); layers not named get 0, as in diffusers."""
    if isinstance(scale, int | float):
        return [float(scale)] * len(names)
    if not isinstance(scale, Mapping):
        raise ValueError(
            f"IP-Adapter scale: expected a number or a dict, got {type(scale).__name__}"
        )
    prefixes = _scale_prefixes(scale, names)
    for prefix in prefixes:
        if not any(_under(name, prefix) for name in names):
            raise ValueError(f"IP-Adapter scale: no cross-attention layer under {prefix!r}")
    scales = []
    for name in names:
        matches = [p for p in prefixes if _under(name, p)]
        scales.append(prefixes[max(matches, key=len)] if matches else 0.0)
    return scales


def _scale_prefixes(scale: Mapping[str, object], names: list[str]) -> dict[str, float]:
    prefixes: dict[str, float] = {}
    for key, value in scale.items():
        if key in ("down", "up"):
            blocks = value if isinstance(value, Mapping) else {"": value}
            for block, block_scale in blocks.items():
                number = str(block).removeprefix("block_")
                prefix = f"{key}_blocks.{number}" if number else f"{key}_blocks"
                prefixes.update(_block_scales(prefix, block_scale, names))
        elif key == "mid":
            prefixes.update(_block_scales("mid_block", value, names))
        else:
            prefixes[str(key)] = float(value)
    return prefixes


def _block_scales(prefix: str, value: object, names: list[str]) -> dict[str, float]:
    if not isinstance(value, list | tuple):
        return {prefix: float(value)}
    if len(value) == 1:
        return {prefix: float(value[0])}
    count = len({n.split(".attentions.")[1].split(".")[0] for n in names if _under(n, prefix)})
    if len(value) != count:
        raise ValueError(
            f"IP-Adapter scale: {prefix} has {count} attention layers, {len(value)} scales given"
        )
    return {f"{prefix}.attentions.{i}": float(s) for i, s in enumerate(value)}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# -- the adapter -----------------------------------------------------------------------------
class IPAdapter(nn.Module):
    """An IP-Adapter with its image encoder: `attach(unet)`, `embed(images, num_frames)`, and
    `added_cond_kwargs={"image_embeds": embeds.for_frames(...)}` in each UNet call."""

    def __init__(
        self,
        path: Path,
        variant: str,
        projection: nn.Module,
        names: list[str],
        processors: list[IPAdapterAttnProcessor2_0],
        image_encoder: CLIPVisionModelWithProjection,
    ):
        super().__init__()
        self.path = path
        self.variant = variant
        self.projection = MultiIPAdapterImageProjection([projection])
        self.processors = nn.ModuleList(processors)
        self.layer_names = names
        self.image_encoder = image_encoder
        # As diffusers builds it: shortest side 224 bicubic, centre crop 224, CLIP mean/std.
        size = image_encoder.config.image_size
        self.image_processor = CLIPImageProcessor(size=size, crop_size=size)
        self._scale: Scale = 1.0
        self._saved: tuple | None = None

    @property
    def scale(self) -> Scale:
        """How strongly the image steers: a float, or per layer (see `layer_scales`)."""
        return self._scale

    @scale.setter
    def scale(self, value: Scale) -> None:
        for processor, s in zip(self.processors, layer_scales(self.layer_names, value)):
            processor.scale = [s]
        self._scale = value

    # -- installing ------------------------------------------------------------------------------
    def attach(self, unet: UNet2DConditionModel | MotionUNet) -> None:
        """Install into the UNet (its attn2 processors and `encoder_hid_proj`, as diffusers'
        `load_ip_adapter` does); moves the adapter and its image encoder to the UNet's device
        and dtype."""
        unet = _image_unet(unet)
        if self._saved is not None:
            raise RuntimeError(f"{self.path}: IP-Adapter already attached; detach() it first")
        if unet.encoder_hid_proj is not None:
            raise ValueError(
                "this UNet already has an encoder_hid_proj (another IP-Adapter attached?)"
            )
        if cross_attention_names(unet) != self.layer_names:
            raise ValueError(
                f"{self.path}: IP-Adapter was loaded for a UNet with other attention layers"
            )
        previous = unet.attn_processors
        self.to(unet.device, unet.dtype)
        unet.set_attn_processor({**previous, **dict(zip(self.layer_names, self.processors))})
        self._saved = (unet, previous, unet.config.encoder_hid_dim_type)
        unet.encoder_hid_proj = self.projection
        unet.config.encoder_hid_dim_type = "ip_image_proj"

    def detach(self) -> None:
        """Give the UNet back exactly as it was before `attach`."""
        if self._saved is None:
            return
        unet, previous, hid_type = self._saved
        unet.encoder_hid_proj = None  # first: the plus resampler has attention processors too
        unet.set_attn_processor(dict(previous))
        unet.config.encoder_hid_dim_type = hid_type
        self._saved = None

    # -- images to embeddings ----------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, images: Images, num_frames: int) -> IPAdapterEmbeds:
        """Encode one reference image for the whole clip, or one per frame: a PIL image, a list
        of PIL images (1 or `num_frames`), or a tensor (b, 3, k, H, W) in [0, 1] with k = 1 or
        `num_frames`. The embeddings land on the projection's device and dtype (attach first)."""
        pixels = self._pixels(images, num_frames)  # (b, k, 3, S, S)
        b, k = pixels.shape[:2]
        weight = next(self.image_encoder.parameters())
        flat = pixels.flatten(0, 1).to(weight.device, weight.dtype)
        if self.variant == "plain":
            cond = self.image_encoder(flat).image_embeds
            uncond = torch.zeros_like(cond[:1])  # diffusers: zeros
        else:
            cond = self._hidden(flat)
            uncond = self._hidden(torch.zeros_like(flat[:1]))  # diffusers: a zero input image
        target = next(self.projection.parameters())
        cond, uncond = (x.to(target.device, target.dtype) for x in (cond, uncond))
        return IPAdapterEmbeds(cond.unflatten(0, (b, k)), uncond.unsqueeze(1), num_frames)

    def _hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]

    def _pixels(self, images: Images, num_frames: int) -> torch.Tensor:
        """CLIP-preprocessed pixels (b, k, 3, 224, 224) of the images of b videos, k per video."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, torch.Tensor):
            if images.ndim != 5 or images.shape[1] != 3:
                shape = tuple(images.shape)
                raise ValueError(
                    f"IP-Adapter images: expected a (b, 3, k, H, W) tensor, got {shape}"
                )
            if images.min() < 0 or images.max() > 1:
                raise ValueError("IP-Adapter images: tensor values must be in [0, 1]")
            b, k = images.shape[0], images.shape[2]
            frames = list(images.detach().float().cpu().transpose(1, 2).flatten(0, 1))
            rescale = False
        else:
            if not images or not all(isinstance(i, Image.Image) for i in images):
                raise ValueError(
                    "IP-Adapter images: expected PIL images or a (b, 3, k, H, W) tensor"
                )
            b, k, frames, rescale = 1, len(images), list(images), True
        if k not in (1, num_frames):
            raise ValueError(
                f"IP-Adapter images: {k} per video; give 1 for the whole clip or one per frame "
                f"({num_frames})"
            )
        out = self.image_processor(images=frames, return_tensors="pt", do_rescale=rescale)
        return out.pixel_values.unflatten(0, (b, k))


@dataclass
class IPAdapterEmbeds:
    """Image-encoder outputs of the reference images: `cond` (b, k, ...) with k = 1 (one image
    for every frame) or `num_frames`, and `uncond` (1, 1, ...) for classifier-free guidance."""

    cond: torch.Tensor
    uncond: torch.Tensor
    num_frames: int

    def for_frames(self, frames: Sequence[int], batch: int, guidance: bool) -> list[torch.Tensor]:
        """`added_cond_kwargs["image_embeds"]` for a UNet call on `batch` videos' `frames`
        folded into the batch: rows `(b f)`, b = [uncond videos; cond videos] under guidance."""
        frames = list(frames)
        if not frames or min(frames) < 0 or max(frames) >= self.num_frames:
            raise ValueError(
                f"IP-Adapter: frames must be in 0..{self.num_frames - 1}, got {frames}"
            )
        videos, k = self.cond.shape[:2]
        if videos not in (1, batch):
            raise ValueError(f"IP-Adapter: images for {videos} videos, but the batch has {batch}")
        index = torch.tensor(frames if k > 1 else [0] * len(frames), device=self.cond.device)
        cond = self.cond[:, index].expand(batch, -1, *self.cond.shape[2:])
        rows = cond.reshape(batch * len(frames), 1, *self.cond.shape[2:])
        if guidance:
            rows = torch.cat([self.uncond.expand_as(rows), rows])
        return [rows]
