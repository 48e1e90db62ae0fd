"""The ManagerTower model: experts, managers, cross-modal encoder, heads."""
from .experts import TextExpert, VisionExpert, load_tokenizer, resize_pos_embed
from .heads import ClassifierHead, ITCHead, ITMHead, MLMHead
from .layer_norm import ApexMissingError, LayerNorm, layer_norm_class, resolve_backend
from .tower import FusionOutput, ManagerTower, init_new_weights

__all__ = ["ManagerTower", "FusionOutput", "TextExpert", "VisionExpert", "load_tokenizer", "resize_pos_embed",
           "MLMHead", "ITMHead", "ClassifierHead", "ITCHead", "LayerNorm", "layer_norm_class", "resolve_backend",
           "ApexMissingError", "init_new_weights"]
