"""ManagerTower: two uni-modal experts, managers in every cross-modal layer, and the cross-modal encoder.

Shapes at base size, image 288, text 50 (N = 6 kept layers, L_C = 6 cross-modal layers, D = 768):
  encode_text   input_ids B x 50                    -> B x 6 x 50 x 768   (RoBERTa layers 7..12)
  encode_image  pixels B x 3 x 288 x 288            -> B x 6 x 325 x 768  (ln_post of ViT blocks 7..12)
  project_*     Linear(768, 768) shared over layers + type row + layer-index rows (one table per expert; none
                for bridgetower and meter, which read one layer per cross-modal layer)
  fuse          managers -> 6 x (self-attn, cross-attn, FFN) per modality -> poolers -> cls_feats B x 1536

The stages are separate methods so that a pre-training step runs the vision expert once for MLM and ITM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from ..config import ModelConfig
from .cross_modal import CrossModalLayer
from .experts import TextExpert, VisionExpert
from .layer_norm import layer_norm_class
from .managers import ExpertInputs, build_manager, normalize_experts

TEXT_TYPE, IMAGE_TYPE, SECOND_IMAGE_TYPE = 0, 1, 2
LAYERLESS_KINDS = ("meter", "bridgetower")  # manager kinds without layer-index embeddings
MANAGER_EPS = 1e-5
CROSS_MODAL_EPS = 1e-12


FUSION_OUTPUTS = ("all", "text", "cls")


@dataclass
class FusionOutput:
    text: torch.Tensor  # B x Lt x D, last cross-modal layer (B x 1 x D with outputs="cls")
    image: torch.Tensor | None  # B x Li x D (B x 1 x D with outputs="cls"; None with outputs="text")
    cls_feats: torch.Tensor | None  # B x 2D: concat of the text and image poolers (None with outputs="text")


class Pooler(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class ManagerTower(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        norm = layer_norm_class(cfg.layer_norm)
        self.text_expert = TextExpert(cfg)
        self.vision_expert = VisionExpert(cfg)
        dim = cfg.hidden_size
        self.text_proj = nn.Linear(self.text_expert.hidden_size, dim)
        self.image_proj = nn.Linear(self.vision_expert.hidden_size, dim)
        self.type_embedding = nn.Embedding(3, dim)  # text, image, NLVR2's second image
        # Layer-index embeddings: one table per expert, a row per layer of that expert (rows 7..12 are used at
        # base size), added where managers mix several layers. BridgeTower and METER have none: each of their
        # cross-modal layers reads one uni-modal layer, so the row would only be a constant bias.
        self.text_layer_embedding = self.image_layer_embedding = None
        if cfg.manager not in LAYERLESS_KINDS:
            self.text_layer_embedding = nn.Embedding(self.text_expert.depth, dim)
            self.image_layer_embedding = nn.Embedding(self.vision_expert.depth, dim)
        self.register_buffer("text_layer_ids", torch.tensor(self.text_expert.kept_layer_ids()), persistent=False)
        self.register_buffer("image_layer_ids", torch.tensor(self.vision_expert.kept_layer_ids()), persistent=False)

        def managers():
            built = [build_manager(cfg.manager, layer, cfg.num_experts, cfg.cross_layers, dim, norm, MANAGER_EPS,
                                   scalar=cfg.manager_weights == "scalar", mask_padding=cfg.manager_mask_padding,
                                   noise=cfg.manager_noise)
                     for layer in range(cfg.cross_layers)]
            return None if cfg.manager == "meter" else nn.ModuleList(built)

        self.text_managers = managers()
        self.image_managers = managers()

        def layers():
            return nn.ModuleList(CrossModalLayer(dim, cfg.num_heads, cfg.intermediate_size, cfg.dropout, norm,
                                                 CROSS_MODAL_EPS) for _ in range(cfg.cross_layers))

        self.text_layers = layers()
        self.image_layers = layers()
        self.text_pooler = Pooler(dim)
        self.image_pooler = Pooler(dim)
        for name, module in self.named_children():
            if not name.endswith("_expert"):
                module.apply(init_new_weights)
        self.activation_checkpointing = cfg.activation_checkpointing
        if cfg.activation_checkpointing:
            encoder = self.text_expert.encoder
            # transformers 5 renamed the method (the old name still works there, with a FutureWarning)
            enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
            enable({"use_reentrant": False})
            self.vision_expert.visual.set_grad_checkpointing(True)
        if cfg.compile:
            for layer in [*self.text_layers, *self.image_layers]:
                layer.compile()

    # --- stages ---------------------------------------------------------------------------------------
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_expert(input_ids, attention_mask)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_expert(pixel_values)

    def project_text(self, layers: torch.Tensor) -> torch.Tensor:
        projected = self.text_proj(layers) + self.type_embedding.weight[TEXT_TYPE]
        if self.text_layer_embedding is None:
            return projected
        return projected + self.text_layer_embedding(self.text_layer_ids)[None, :, None, :]

    def project_image(self, layers: torch.Tensor, image_type: int = IMAGE_TYPE) -> torch.Tensor:
        projected = self.image_proj(layers) + self.type_embedding.weight[image_type]
        if self.image_layer_embedding is None:
            return projected
        return projected + self.image_layer_embedding(self.image_layer_ids)[None, :, None, :]

    def fuse(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor,
             outputs: str = "all") -> FusionOutput:
        """Cross-modal encoder over projected experts: text B x N x Lt x D (mask B x Lt), image B x N x Li x D.

        `outputs` says what the caller reads, and the last cross-modal layer computes only that (the layers below
        feed both streams, so they run whole): "all"; "text", the text stream alone (MLM: the image stream's last
        layer and the poolers are skipped); "cls", the poolers alone (ITM and the classifiers: the last layer
        computes each stream's first token, whose query attends to the whole streams as before). The values read
        are those of "all" up to float rounding. With dropout > 0 the skipped rows draw no dropout masks."""
        if outputs not in FUSION_OUTPUTS:
            raise ValueError(f"unknown fusion outputs {outputs!r}: one of {', '.join(FUSION_OUTPUTS)}")
        text_keep = text_mask.bool()
        meter = self.text_managers is None
        text_normed = None if meter else normalize_experts(text, MANAGER_EPS)
        image_normed = None if meter else normalize_experts(image, MANAGER_EPS)
        prev_text = prev_image = None
        text_history, image_history = [], []
        last = len(self.text_layers) - 1
        for layer in range(len(self.text_layers)):
            if meter:
                text_in = text[:, -1] if prev_text is None else prev_text
                image_in = image[:, -1] if prev_image is None else prev_image
            else:
                text_in, _ = self.text_managers[layer](
                    ExpertInputs(text, text_normed, prev_text, prev_image, None, text_history))
                image_in, _ = self.image_managers[layer](
                    ExpertInputs(image, image_normed, prev_image, prev_text, text_keep, image_history))
            first_token = layer == last and outputs == "cls"
            prev_text = self._run(self.text_layers[layer], text_in, text_keep, image_in, None, first_token)
            if layer == last and outputs == "text":
                return FusionOutput(prev_text, None, None)
            prev_image = self._run(self.image_layers[layer], image_in, None, text_in, text_keep, first_token)
            text_history.append(prev_text)
            image_history.append(prev_image)
        cls_feats = torch.cat([self.text_pooler(prev_text), self.image_pooler(prev_image)], dim=-1)
        return FusionOutput(prev_text, prev_image, cls_feats)

    def _run(self, layer, x, x_mask, other, other_mask, first_token: bool = False):
        if self.activation_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(layer, x, x_mask, other, other_mask, first_token,
                                                     use_reentrant=False)
        return layer(x, x_mask, other, other_mask, first_token)

    def forward(self, input_ids, attention_mask, pixel_values, image_type: int = IMAGE_TYPE) -> FusionOutput:
        text = self.project_text(self.encode_text(input_ids, attention_mask))
        image = self.project_image(self.encode_image(pixel_values), image_type)
        return self.fuse(text, attention_mask, image)

    # --- weights folders --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder, **overrides) -> "ManagerTower":
        """The tower of a weights folder (config.json + model.safetensors, docs/weights.md: what `python -m
        pretrain export RUN --format hf` and `python -m doors.convert` write), in eval mode; the folder's tokenizer
        becomes model.tokenizer. Reads JSON and safetensors only: nothing is unpickled. `overrides` are ModelConfig
        fields (image_size=384 resizes the position embeddings as fine-tuning does; layer_norm="apex", ...)."""
        from ..hf_export import WeightsFolderError, folder_model_config, read_folder, tower_state
        from .experts import resize_pos_embed

        state, config = read_folder(folder)
        tower = cls(folder_model_config(config, folder, **overrides))
        weights = tower_state(state)
        pos_key = "vision_expert.visual.positional_embedding"
        current = tower.vision_expert.visual.positional_embedding
        if pos_key in weights and weights[pos_key].shape != current.shape:
            weights[pos_key] = resize_pos_embed(weights[pos_key], int(math.isqrt(current.shape[0] - 1)))
        missing, unexpected = tower.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise WeightsFolderError(f"{folder}'s model.safetensors does not fit its config.json ({len(missing)} tower "
                                     f"tensors missing, {len(unexpected)} unexpected, e.g. "
                                     f"{(missing or unexpected)[:2]})")
        return tower.eval()

    # --- inspection -----------------------------------------------------------------------------------
    def manager_weights(self) -> dict[str, torch.Tensor]:
        """Mean aggregation weight of each expert at each cross-modal layer: {"text"/"image": L_C x N}."""
        out = {}
        for side, managers in (("text", self.text_managers), ("image", self.image_managers)):
            if managers is None:
                continue
            rows = [m.last_weights for m in managers if getattr(m, "last_weights", None) is not None]
            if len(rows) == len(managers):
                out[side] = torch.stack(rows)
        return out

    def set_image_size(self, image_size: int) -> None:
        self.vision_expert.set_image_size(image_size)


def init_new_weights(module: nn.Module) -> None:
    """New (non-expert) layers: Linear/Embedding N(0, 0.02), bias 0, LayerNorm 1/0 (docs/recipe.md §1)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.data.fill_(1.0)
        module.bias.data.zero_()
