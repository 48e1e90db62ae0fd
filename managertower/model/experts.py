"""The uni-modal experts: a Hugging Face text encoder and an open_clip vision transformer.

Both return the hidden states of their top N layers (the "insights" the managers aggregate). Weights always
come from local paths; with no path the architecture is built with random weights (tests, FLOP counting).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, ModelConfig

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_TOKENIZER = ASSETS / "tiny_tokenizer"

# Architectures built when no local weights are given.
ROBERTA_BASE = dict(model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                    num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
                    type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
TINY_TEXT = dict(model_type="bert", vocab_size=274, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                 intermediate_size=128, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
TINY_VISION = dict(image_size=64, patch_size=8, width=64, layers=4, head_width=32, mlp_ratio=2.0)


def load_tokenizer(cfg: ModelConfig):
    """The text expert's own (fast) tokenizer, from a local folder."""
    from transformers import AutoTokenizer

    path = cfg.tokenizer or cfg.text_expert
    if path is None:
        if cfg.size != "tiny":
            raise ConfigError("model.size=base without model.text_expert has no tokenizer: set model.tokenizer or "
                              "model.text_expert to a local Hugging Face folder (e.g. a saved roberta-base)")
        path = str(TINY_TOKENIZER)
    return AutoTokenizer.from_pretrained(path)


class TextExpert(nn.Module):
    """A transformers encoder (RoBERTa, BERT, ... anything AutoModel loads) without its pooler."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if cfg.text_expert is not None:
            self.encoder = AutoModel.from_pretrained(cfg.text_expert, add_pooling_layer=False,
                                                     attn_implementation="sdpa")
        else:
            arch = dict(TINY_TEXT if cfg.size == "tiny" else ROBERTA_BASE)
            arch.update(cfg.text_config)
            model_type = arch.pop("model_type")
            config = AutoConfig.for_model(model_type, **arch)
            config._attn_implementation = "sdpa"
            self.encoder = AutoModel.from_config(config, add_pooling_layer=False)
        self.hidden_size = self.encoder.config.hidden_size
        self.depth = self.encoder.config.num_hidden_layers
        self.vocab_size = self.encoder.config.vocab_size
        if cfg.num_experts > self.depth:
            raise ConfigError(f"model.num_experts={cfg.num_experts} is larger than the text expert's depth "
                              f"({self.depth} layers): use at most {self.depth}")
        self.num_kept = cfg.num_experts

    def kept_layer_ids(self) -> list[int]:
        """0-based indices of the kept layers (layers 7..12 of a 12-layer expert are 6..11)."""
        return list(range(self.depth - self.num_kept, self.depth))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Returns B x N x L x D_text: the outputs of the top N layers.

        The padding mask goes in ready-made (B x 1 x 1 x L, True: attend), as SDPA takes it: from a 2-D mask
        transformers first asks whether any token is padded (`mask.all()`), a read-back that makes every
        micro-step wait for the GPU."""
        if attention_mask is not None:
            attention_mask = attention_mask[:, None, None, :].bool()
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                           return_dict=True)
        return torch.stack(out.hidden_states[-self.num_kept:], dim=1)


def resize_pos_embed(pos: torch.Tensor, new_grid: int) -> torch.Tensor:
    """(1 + G*G, D) -> (1 + new_grid^2, D): bicubic, align_corners=False, no antialias (the released code)."""
    cls_pos, grid_pos = pos[:1], pos[1:]
    old_grid = int(round(grid_pos.shape[0] ** 0.5))
    if old_grid * old_grid != grid_pos.shape[0]:
        raise ValueError(f"position embedding of {grid_pos.shape[0]} patches is not a square grid")
    if old_grid == new_grid:
        return pos
    grid = grid_pos.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False,
                         antialias=False).to(pos.dtype)
    return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1)], dim=0)


def _load_open_clip_visual(name: str, checkpoint: str) -> nn.Module:
    """The vision tower of an open_clip model, weights from a local checkpoint (open_clip or OpenAI file)."""
    import open_clip

    try:
        model = open_clip.create_model(name, pretrained=checkpoint, device="cpu")
    except RuntimeError as err:
        raise ConfigError(f"model.vision_checkpoint={checkpoint!r} does not fit open_clip model {name!r}: {err}") from None
    return model.visual


class VisionExpert(nn.Module):
    """An open_clip VisionTransformer; every kept block's output goes through the shared `ln_post`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        import open_clip
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        if cfg.vision_expert == "tiny":
            vision_cfg, quick_gelu = dict(TINY_VISION), True
            embed_dim = 32
        else:
            model_cfg = open_clip.get_model_config(cfg.vision_expert)
            if model_cfg is None:
                raise ConfigError(f"model.vision_expert={cfg.vision_expert!r} is not an open_clip model name "
                                  "(open_clip.list_models() lists them; ViT towers only)")
            vision_cfg, quick_gelu = dict(model_cfg["vision_cfg"]), model_cfg.get("quick_gelu", False)
            embed_dim = model_cfg["embed_dim"]
        vision_cfg.update(cfg.vision_config)
        if cfg.vision_checkpoint is not None and cfg.vision_config:
            raise ConfigError("model.vision_config changes the architecture, but model.vision_checkpoint is built "
                              f"from open_clip's {cfg.vision_expert!r} config: drop model.vision_config, or register "
                              "a matching config with open_clip.add_model_config and name it in model.vision_expert")
        if cfg.vision_checkpoint is not None:
            visual = _load_open_clip_visual(cfg.vision_expert, cfg.vision_checkpoint)
        else:
            visual = _build_vision_tower(embed_dim, CLIPVisionCfg(**vision_cfg), quick_gelu=quick_gelu)
        if not hasattr(visual, "transformer") or not hasattr(visual, "ln_post"):
            raise ConfigError(f"model.vision_expert={cfg.vision_expert!r} is not a ViT tower")
        visual.proj = None  # the projection to CLIP's joint space is unused
        patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
        if cfg.image_size % patch:
            raise ConfigError(f"model.image_size={cfg.image_size} is not a multiple of the vision expert's patch "
                              f"size {patch}: use e.g. {cfg.image_size // patch * patch} or "
                              f"{(cfg.image_size // patch + 1) * patch}")
        self.patch_size = patch
        self.visual = visual
        self.hidden_size = visual.transformer.width
        self.depth = len(visual.transformer.resblocks)
        if cfg.num_experts > self.depth:
            raise ConfigError(f"model.num_experts={cfg.num_experts} is larger than the vision expert's depth "
                              f"({self.depth} blocks): use at most {self.depth}")
        self.num_kept = cfg.num_experts
        self.set_image_size(cfg.image_size)

    def set_image_size(self, image_size: int) -> None:
        """Resize the position embeddings once for a new resolution (224 -> 288, 384, 576 ...)."""
        if image_size % self.patch_size:
            raise ConfigError(f"image size {image_size} is not a multiple of the patch size {self.patch_size}")
        grid = image_size // self.patch_size
        visual = self.visual
        with torch.no_grad():
            resized = resize_pos_embed(visual.positional_embedding.data, grid)
        if resized.shape != visual.positional_embedding.shape:
            visual.positional_embedding = nn.Parameter(resized)
        visual.grid_size = (grid, grid)
        visual.image_size = (image_size, image_size)
        self.image_size = image_size

    def kept_layer_ids(self) -> list[int]:
        return list(range(self.depth - self.num_kept, self.depth))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Returns B x N x (1 + grid^2) x D_vision: `ln_post` of each kept block, class token first."""
        visual = self.visual
        x = visual._embeds(pixel_values)
        transformer = visual.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        first_kept = self.depth - self.num_kept
        kept = []
        for i, block in enumerate(transformer.resblocks):
            if transformer.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i >= first_kept:
                kept.append(x if transformer.batch_first else x.transpose(0, 1))
        return visual.ln_post(torch.stack(kept, dim=1))
