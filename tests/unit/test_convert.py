"""Weights from elsewhere and for Hugging Face users (managertower/convert.py, hf_export.py, docs/weights.md).

- transformers' BridgeTower (tiny, every parameter redrawn at random: LayerNorm affines included, so no mapping
  hides behind an identity init) -> our tower: in float64, eval mode, the cross-modal features, pooled features,
  MLM, ITM and ITC outputs equal transformers' within 1e-6 (transformers' cross-modal and MLM-head LayerNorms are
  set to the released eps 1e-12 first, docs/weights.md); exported back with --format hf-bridgetower, transformers
  loads every original tensor bitwise and gives the same logits.
- Released ManagerTower and BridgeTower checkpoints, built here with the released names and shapes (the released
  modules' parameters and eval forward restated from LooperXX/ManagerTower src/modules/heads.py, bt_module.py,
  mt_module.py), pickled as Lightning .ckpt files: every key mapped or dropped with its reason, the converted
  tower gives the released forward's outputs; a missing or an unknown key is an error naming it.
- Weights folders load without unpickling anything; a pickled payload in a .pt is refused before it runs.
"""
from __future__ import annotations

import json
import math
import pickle
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from managertower.config import ConfigError
from managertower.convert import ConversionError, convert_checkpoint
from managertower.hf_export import read_folder, tower_state
from managertower.model import ITCHead, ITMHead, ManagerTower, MLMHead
from managertower.model.experts import TINY_TEXT, TINY_TOKENIZER, TINY_VISION

TOL = dict(rtol=0, atol=1e-6)
ROBERTA = dict(vocab_size=99, hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128,
               max_position_embeddings=40, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
HF_VISION = dict(hidden_size=64, num_hidden_layers=4, patch_size=8, image_size=32)


# --- shared helpers ---------------------------------------------------------------------------------------------
def redraw(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter at random: LayerNorm weights 1 + N(0, 0.2^2), everything else N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norms = {id(m.weight) for m in module.modules() if isinstance(m, nn.LayerNorm) and m.weight is not None}
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(1 + 0.2 * noise if id(p) in norms else 0.1 * noise)
    return module


def text_inputs(vocab: int, pad: int, bos: int, eos: int, length: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(max(pad, bos, eos) + 1, vocab, (2, length), generator=gen)
    ids[:, 0], ids[0, -1] = bos, eos
    mask = torch.ones_like(ids)
    ids[1, 4], ids[1, 5:], mask[1, 5:] = eos, pad, 0
    return ids, mask


def pixels(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def released_eps(hf_model) -> None:
    """transformers builds the cross-modal layers' and the MLM head's LayerNorms with eps 1e-5; the released code and
    this tower use 1e-12 (docs/weights.md): set them equal before comparing."""
    bt = hf_model.bridgetower if hasattr(hf_model, "bridgetower") else hf_model
    for module in [*bt.cross_modal_text_layers.modules(), *bt.cross_modal_image_layers.modules(),
                   *(hf_model.mlm_score.modules() if hasattr(hf_model, "mlm_score") else [])]:
        if isinstance(module, nn.LayerNorm):
            module.eps = 1e-12


def head(cls, state: dict, prefix: str, *args) -> nn.Module:
    module = cls(*args)
    module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return module.double().eval()


def every_key_accounted(folder: Path, source_keys) -> dict:
    report = json.loads((folder / "conversion.json").read_text())
    assert set(report["mapped"]) | set(report["dropped"]) == set(source_keys)
    assert not set(report["mapped"]) & set(report["dropped"])
    return report


# --- transformers' BridgeTower ----------------------------------------------------------------------------------
def hf_config(heads: int = 2):
    from transformers import BridgeTowerConfig

    return BridgeTowerConfig(text_config={**ROBERTA, "num_attention_heads": heads}, vision_config=HF_VISION,
                             hidden_size=64, num_hidden_layers=3, num_attention_heads=heads,
                             contrastive_hidden_size=16,
                             logit_scale_init_value=2.6592)  # BridgeTowerForContrastiveLearning reads it; no default


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """One redrawn tiny BridgeTower saved three ways (MLM, ITM, ITC heads, the same tower) and converted."""
    from transformers import (BridgeTowerForContrastiveLearning, BridgeTowerForImageAndTextRetrieval,
                              BridgeTowerForMaskedLM)

    root = tmp_path_factory.mktemp("hf")
    models = {"mlm": redraw(BridgeTowerForMaskedLM(hf_config()), 1)}
    tower = models["mlm"].bridgetower.state_dict()
    for seed, (name, cls) in enumerate((("itm", BridgeTowerForImageAndTextRetrieval),
                                        ("itc", BridgeTowerForContrastiveLearning)), start=2):
        model = redraw(cls(hf_config()), seed)
        model.bridgetower.load_state_dict(tower)
        models[name] = model
    with torch.no_grad():
        models["itc"].logit_scale.fill_(2.3)
    converted = {}
    for name, model in models.items():
        model.save_pretrained(str(root / f"hf-{name}"))
        converted[name] = convert_checkpoint(root / f"hf-{name}", root / f"ours-{name}")
        model.double().eval()
        released_eps(model)
    return root, models, converted


def test_hf_bridgetower_converts_exactly(hf):
    root, models, converted = hf
    from safetensors.torch import load_file

    assert converted["mlm"].format == "hf-bridgetower" and converted["mlm"].model.manager == "bridgetower"
    every_key_accounted(root / "ours-mlm", load_file(str(root / "hf-mlm" / "model.safetensors")))
    dropped = every_key_accounted(root / "ours-itc", load_file(str(root / "hf-itc" / "model.safetensors")))["dropped"]
    assert set(dropped) == {"bridgetower.text_model.pooler.dense.weight", "bridgetower.text_model.pooler.dense.bias",
                            "itc_cross_modal_head.fc.weight", "itc_cross_modal_head.fc.bias"}
    assert any("eps" in note for note in converted["mlm"].notes)  # the LayerNorm eps difference is reported

    tower = ManagerTower.from_pretrained(root / "ours-mlm").double()
    assert not tower.training
    ids, mask = text_inputs(99, pad=1, bos=0, eos=2)
    pix = pixels(32)
    with torch.no_grad():
        ours = tower(ids, mask, pix)
        theirs = models["mlm"].bridgetower(input_ids=ids, attention_mask=mask, pixel_values=pix)
        torch.testing.assert_close(ours.text, theirs.text_features, **TOL)
        torch.testing.assert_close(ours.image, theirs.image_features, **TOL)
        torch.testing.assert_close(ours.cls_feats, theirs.pooler_output, **TOL)
        state, _ = read_folder(root / "ours-mlm")
        mlm, _ = head(MLMHead, state, "mlm_head.", 64, 99)(ours.text)
        torch.testing.assert_close(mlm, models["mlm"](input_ids=ids, attention_mask=mask, pixel_values=pix).logits,
                                   **TOL)

        state, _ = read_folder(root / "ours-itm")
        itm = head(ITMHead, state, "itm_head.", 64)(ManagerTower.from_pretrained(root / "ours-itm").double()(
            ids, mask, pix).cls_feats)
        torch.testing.assert_close(itm, models["itm"](input_ids=ids, attention_mask=mask, pixel_values=pix).logits,
                                   **TOL)

        # ITC: transformers' image head acts on the projected, typed class token; ours is its composition
        state, _ = read_folder(root / "ours-itc")
        itc = head(ITCHead, state, "itc_head.", 64, 64, 16)
        tower = ManagerTower.from_pretrained(root / "ours-itc").double()
        text_emb, image_emb = itc(tower.encode_text(ids, mask)[:, -1, 0], tower.encode_image(pix)[:, -1, 0])
        reference = models["itc"](input_ids=ids, attention_mask=mask, pixel_values=pix)
        torch.testing.assert_close(text_emb, reference.text_embeds, **TOL)
        torch.testing.assert_close(image_emb, reference.image_embeds, **TOL)
        assert 1 / itc.temperature().item() == pytest.approx(math.exp(2.3), rel=1e-6)


def test_hf_bridgetower_export_loads_in_transformers_with_our_logits(hf, tmp_path):
    """Our bridgetower tower -> --format hf-bridgetower -> transformers' from_pretrained: every original tensor
    comes back bitwise, and the MLM and ITM logits are ours."""
    from transformers import BridgeTowerForImageAndTextRetrieval, BridgeTowerForMaskedLM

    from managertower.hf_export import export_bridgetower, folder_model_config

    root, models, _ = hf
    state, config = read_folder(root / "ours-mlm")
    itm_state, _ = read_folder(root / "ours-itm")
    state.update({k: v for k, v in itm_state.items() if k.startswith("itm_head.")})
    export_bridgetower(state, folder_model_config(config, root / "ours-mlm"), tmp_path / "bt", tokenizer=None)
    assert "Not exported" in (tmp_path / "bt" / "README.md").read_text()

    mlm = BridgeTowerForMaskedLM.from_pretrained(str(tmp_path / "bt"))
    itm = BridgeTowerForImageAndTextRetrieval.from_pretrained(str(tmp_path / "bt"))
    original = BridgeTowerForMaskedLM(hf_config())
    original.load_state_dict({k: v.float() for k, v in models["mlm"].state_dict().items()})
    for key, value in original.state_dict().items():  # the text pooler is dropped on import, exported as zeros
        assert torch.equal(mlm.state_dict()[key], torch.zeros_like(value) if ".pooler." in key else value), key
    for model in (mlm, itm):
        model.double().eval()
        released_eps(model)
    tower = ManagerTower.from_pretrained(root / "ours-mlm").double()
    ids, mask = text_inputs(99, pad=1, bos=0, eos=2, seed=3)
    pix = pixels(32, seed=3)
    with torch.no_grad():
        ours = tower(ids, mask, pix)
        logits, _ = head(MLMHead, state, "mlm_head.", 64, 99)(ours.text)
        torch.testing.assert_close(mlm(input_ids=ids, attention_mask=mask, pixel_values=pix).logits, logits, **TOL)
        torch.testing.assert_close(itm(input_ids=ids, attention_mask=mask, pixel_values=pix).logits,
                                   head(ITMHead, state, "itm_head.", 64)(ours.cls_feats), **TOL)


def test_a_bridgetower_model_folder_with_one_shared_link_tower(tmp_path):
    """A bare BridgeTowerModel (no `bridgetower.` prefix, no head), one link tower shared by every layer, its
    weights in an older folder's pytorch_model.bin (read with weights_only)."""
    from transformers import BridgeTowerModel

    config = hf_config()
    config.share_link_tower_layers = True
    model = redraw(BridgeTowerModel(config), 13)
    model.config.save_pretrained(str(tmp_path / "hf"))
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    done = convert_checkpoint(tmp_path / "hf", tmp_path / "out")
    assert done.task is None and not any(k.startswith(("mlm_head.", "itm_head.")) for k in read_folder(
        tmp_path / "out")[0])
    # transformers' forward indexes the link towers, which fails for its own shared one: hand it a list of it
    for side in ("text", "image"):
        shared = getattr(model, f"cross_modal_{side}_link_tower")
        setattr(model, f"cross_modal_{side}_link_tower", nn.ModuleList([shared] * (config.num_hidden_layers - 1)))
    model.double().eval()
    released_eps(model)
    ids, mask = text_inputs(99, pad=1, bos=0, eos=2)
    with torch.no_grad():
        ours = ManagerTower.from_pretrained(tmp_path / "out").double()(ids, mask, pixels(32))
        torch.testing.assert_close(ours.cls_feats, model(input_ids=ids, attention_mask=mask,
                                                         pixel_values=pixels(32)).pooler_output, **TOL)


# --- runs exported through the door -----------------------------------------------------------------------------
def fake_run(root: Path, model_cfg, state: dict, step: int = 3) -> Path:
    """A run folder holding one complete stage-0 checkpoint of `state` (what DeepSpeed writes without ZeRO
    partitions) and its meta.json."""
    from managertower.config import Config

    folder = root / "checkpoints" / f"step-{step}"
    folder.mkdir(parents=True)
    torch.save({"module": state}, folder / "mp_rank_00_model_states.pt")
    config = Config(model=model_cfg).to_dict()
    (folder / "meta.json").write_text(json.dumps({"step": step, "config": config}))
    (folder / "COMPLETE").write_text("")
    (root / "checkpoints" / "latest").write_text(f"step-{step}")
    return root


def test_pretrain_export_formats(hf, tmp_path, capsys):
    from transformers import BridgeTowerForMaskedLM

    from managertower.hf_export import folder_model_config
    from pretrain.__main__ import main

    root, models, _ = hf
    state, config = read_folder(root / "ours-mlm")
    run = fake_run(tmp_path / "run", folder_model_config(config, root / "ours-mlm"), state)
    assert main(["export", str(run)]) == 0  # the default stays one fp32 file
    blob = torch.load(run / "export" / "model_fp32.pt", weights_only=True)
    assert blob["step"] == 3 and all(torch.equal(blob["state_dict"][k], v) for k, v in state.items())
    assert main(["export", str(run), "--format", "hf"]) == 0
    folder = run / "export" / "hf"
    card = (folder / "README.md").read_text()
    assert "bridgetower" in card and "steps: 3" in card
    exported = ManagerTower.from_pretrained(folder)
    for key, value in tower_state(state).items():
        assert torch.equal(exported.state_dict()[key], value), key
    assert main(["export", str(run), "--format", "hf-bridgetower", "--out", str(tmp_path / "bt")]) == 0
    reloaded = BridgeTowerForMaskedLM.from_pretrained(str(tmp_path / "bt"))
    for key, value in models["mlm"].state_dict().items():
        if ".text_model.pooler." not in key:
            assert torch.equal(reloaded.state_dict()[key], value.float()), key
    capsys.readouterr()
    assert main(["export", str(tmp_path / "nothing"), "--format", "hf"]) == 2
    assert "nothing" in capsys.readouterr().err


def test_hf_bridgetower_export_refuses_what_transformers_cannot_hold(tmp_path):
    from managertower.config import ModelConfig
    from managertower.hf_export import export_bridgetower

    with pytest.raises(ConfigError, match="bridgetower kind only.*RoBERTa"):
        export_bridgetower({}, ModelConfig(size="tiny", manager="aaue_fused"), tmp_path / "x", tokenizer=None)


# --- released checkpoints ---------------------------------------------------------------------------------------
class LayerAttention(nn.Module):
    """Released bert_model.py `LayerAttention` (one head): the fused query's scores, before the softmax."""

    def __init__(self, dim):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, query, key):
        return self.q_proj(query) @ self.k_proj(key).transpose(-1, -2) / math.sqrt(query.shape[-1])


class ReleasedSAUE(nn.Module):
    """Released heads.py `SAUE` (eval forward): softmax over the N layer scores, then the raw W_C row."""

    def __init__(self, n, dim, layer):
        super().__init__()
        self.n, self.layer = n, layer
        prev = int(layer > 0)
        self.layer_scores = nn.Parameter(torch.ones(1, n + prev, 1, dim))
        self.LayerNorm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n + prev))
        self.softmax_temperature = nn.Parameter(torch.ones(1))
        self.softmax_temperature_cross = nn.Parameter(torch.ones(1))

    def forward(self, hidden, cross, extra_query=None):
        reps = [self.LayerNorm[i](hidden[:, i]) for i in range(self.n)]
        if self.layer:
            reps.append(self.LayerNorm[self.n](cross))
        scores = torch.cat([torch.softmax(self.layer_scores[:, :self.n] / self.softmax_temperature, dim=1),
                            self.layer_scores[:, self.n:]], dim=1)
        return (scores * torch.stack(reps, dim=1)).sum(1)


class ReleasedAAUE(nn.Module):
    """Released heads.py `AAUE` (eval forward, vector weights): per-token scores from the fused query."""

    def __init__(self, n, dim):
        super().__init__()
        self.n = n
        self.layer_scores_cross = nn.Parameter(torch.ones(1, 1, 1, dim))
        self.linear_controller = nn.Linear(2 * dim, n)
        self.fusion_attention = LayerAttention(dim)
        self.LayerNorm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n + 1))
        self.extra_query_LayerNorm = nn.LayerNorm(dim)
        self.softmax_temperature = nn.Parameter(torch.ones(1))
        self.softmax_temperature_cross = nn.Parameter(torch.ones(1))

    def forward(self, hidden, cross, extra_query):
        hidden = torch.stack([self.LayerNorm[i](hidden[:, i]) for i in range(self.n)], dim=1)
        extra = self.extra_query_LayerNorm(extra_query)
        cross = self.LayerNorm[self.n](cross)
        fused = torch.cat([torch.softmax(self.fusion_attention(cross, extra), dim=-1) @ extra, cross], dim=-1)
        generated = self.linear_controller(fused).transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, hidden.shape[-1])
        scores = torch.cat([generated, self.layer_scores_cross.expand(hidden.shape[0], -1, hidden.shape[2], -1)], 1)
        scores = torch.cat([torch.softmax(scores[:, :self.n] / self.softmax_temperature, dim=1), scores[:, self.n:]], 1)
        return (scores * torch.cat([hidden, cross[:, None]], dim=1)).sum(1)


class Manager(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.manager_layer = layer


class Holder(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


class ReleasedMT(nn.Module):
    """The released MTTransformer's parameters (mt_module.py `__init__`, every head at once) and its eval `infer`:
    a BERT text expert (the released code's choice for a non-RoBERTa tokenizer), a CLIP ViT of width/64 heads."""

    def __init__(self, n=2, layers=2, dim=64, answers=5):
        super().__init__()
        from open_clip.model import CLIPVisionCfg, _build_vision_tower
        from transformers import BertConfig, BertModel, BridgeTowerTextConfig
        from transformers.models.bridgetower.modeling_bridgetower import BridgeTowerBertCrossLayer

        self.n = n
        text = {k: v for k, v in TINY_TEXT.items() if k != "model_type"}
        self.text_transformer = BertModel(BertConfig(**text))  # with its pooler, as from_pretrained builds it
        visual = _build_vision_tower(32, CLIPVisionCfg(**{**TINY_VISION, "head_width": 64}), quick_gelu=True)
        visual.proj = None
        self.vit_model = Holder(visual=visual, ln_final=nn.LayerNorm(32))
        self.vit_model.positional_embedding = nn.Parameter(torch.zeros(77, 32))
        self.cross_modal_text_transform, self.cross_modal_image_transform = nn.Linear(64, dim), nn.Linear(64, dim)
        self.token_type_embeddings = nn.Embedding(2, dim)
        cross = BridgeTowerTextConfig(hidden_size=dim, num_attention_heads=2, intermediate_size=128,
                                      layer_norm_eps=1e-12)
        cross._attn_implementation = "eager"
        self.cross_modal_image_layers = nn.ModuleList(BridgeTowerBertCrossLayer(cross) for _ in range(layers))
        self.cross_modal_text_layers = nn.ModuleList(BridgeTowerBertCrossLayer(cross) for _ in range(layers))
        self.cross_modal_image_pooler = Holder(dense=nn.Linear(dim, dim))
        self.cross_modal_text_pooler = Holder(dense=nn.Linear(dim, dim))
        self.temperature = nn.Parameter(torch.tensor(0.07))
        self.mlm_score = Holder(transform=Holder(dense=nn.Linear(dim, dim), LayerNorm=nn.LayerNorm(dim, eps=1e-12)),
                                decoder=nn.Linear(dim, 274, bias=False))
        self.mlm_score.bias = nn.Parameter(torch.zeros(274))
        self.itm_score = Holder(fc=nn.Linear(2 * dim, 2))
        self.cross_modal_itc_text_head = Holder(fc=nn.Linear(64, 16))
        self.cross_modal_itc_image_head = Holder(fc=nn.Linear(64, 16))
        self.layer_embeddings_text, self.layer_embeddings_image = nn.Embedding(4, dim), nn.Embedding(4, dim)
        for side in ("text", "image"):
            setattr(self, f"cross_modal_{side}_manager_tower", nn.ModuleList(
                Manager(ReleasedSAUE(n, dim, 0) if i == 0 else ReleasedAAUE(n, dim)) for i in range(layers)))
        self.vqa_classifier = nn.Sequential(nn.Linear(2 * dim, 4 * dim), nn.LayerNorm(4 * dim), nn.GELU(),
                                            nn.Linear(4 * dim, answers))
        self.rank_output = nn.Linear(2 * dim, 1)

    def uni_modal(self, ids, mask, pix):
        text = torch.stack(self.text_transformer(ids, mask, output_hidden_states=True).hidden_states[-self.n:], 1)
        visual = self.vit_model.visual
        x, kept = visual._embeds(pix), []
        for i, block in enumerate(visual.transformer.resblocks):
            x = block(x)
            if i >= len(visual.transformer.resblocks) - self.n:
                kept.append(visual.ln_post(x))
        return text, torch.stack(kept, 1)

    def infer(self, ids, mask, pix):
        text, image = self.uni_modal(ids, mask, pix)
        text = (self.cross_modal_text_transform(text) + self.token_type_embeddings.weight[0]
                + self.layer_embeddings_text.weight[-self.n:][None, :, None])
        image = (self.cross_modal_image_transform(image) + self.token_type_embeddings.weight[1]
                 + self.layer_embeddings_image.weight[-self.n:][None, :, None])
        extend = (1.0 - mask[:, None, None, :].to(text.dtype)) * torch.finfo(text.dtype).min
        x = y = None
        for i, (tm, im) in enumerate(zip(self.cross_modal_text_manager_tower, self.cross_modal_image_manager_tower)):
            x_in, y_in = tm.manager_layer(text, x, y), im.manager_layer(image, y, x)
            x = self.cross_modal_text_layers[i](x_in, y_in, attention_mask=extend)[0]
            y = self.cross_modal_image_layers[i](y_in, x_in, encoder_attention_mask=extend)[0]
        cls = torch.cat([torch.tanh(self.cross_modal_text_pooler.dense(x[:, 0])),
                         torch.tanh(self.cross_modal_image_pooler.dense(y[:, 0]))], -1)
        return x, y, cls

    def mlm(self, x):
        t = self.mlm_score.transform
        return self.mlm_score.decoder(t.LayerNorm(F.gelu(t.dense(x)))) + self.mlm_score.bias


def tiny_tokenizer_dir(root: Path) -> Path:
    """The bundled tiny word-piece tokenizer with the config.json of its BERT text expert (the heads, eps)."""
    from transformers import BertConfig

    folder = root / "tokenizer"
    shutil.copytree(TINY_TOKENIZER, folder)
    BertConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"}).save_pretrained(str(folder))
    return folder


def lightning_checkpoint(path: Path, state: dict, config: dict, monkeypatch) -> Path:
    """A .ckpt as PyTorch Lightning writes it: the state dict and the sacred config inside Lightning's
    AttributeDict and sacred's read-only containers (classes registered here under their real module names only
    while the file is written: the converter never imports them)."""
    def register(name: str, cls_name: str, base, reduce_to):
        module = types.ModuleType(name)
        cls = type(cls_name, (base,), {} if reduce_to is None else
                   {"__reduce__": lambda self: (type(self), (reduce_to(self),))})
        cls.__module__ = name
        setattr(module, cls_name, cls)
        parts = name.split(".")
        for i in range(1, len(parts)):
            monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        monkeypatch.setitem(sys.modules, name, module)
        return cls

    attribute_dict = register("pytorch_lightning.utilities.parsing", "AttributeDict", dict, None)
    read_only_dict = register("sacred.config.custom_containers", "ReadOnlyDict", dict, dict)
    read_only_list = sys.modules["sacred.config.custom_containers"].ReadOnlyList = type(
        "ReadOnlyList", (list,), {"__reduce__": lambda self: (type(self), (list(self),)),
                                  "__module__": "sacred.config.custom_containers"})
    config = read_only_dict({k: read_only_list(v) if isinstance(v, list) else v for k, v in config.items()})
    torch.save({"state_dict": state, "hyper_parameters": attribute_dict(config=config), "global_step": 1234,
                "epoch": 3, "pytorch-lightning_version": "1.3.2"}, path)
    for name in ("pytorch_lightning.utilities.parsing", "sacred.config.custom_containers"):
        monkeypatch.delitem(sys.modules, name)
    return path


HPARAMS = {"tokenizer": "bert-base-uncased", "num_heads": 2, "image_size": 64, "max_text_len": 24, "drop_rate": 0.1,
           "manager_type": "AAUE", "datasets": ["coco", "vg"]}


@pytest.fixture(scope="module")
def released():
    return redraw(ReleasedMT(), 7).double().eval()


@pytest.mark.parametrize("kind", ["pretrain", "vqa", "retrieval"])
def test_released_mt_checkpoint_converts_exactly(released, kind, tmp_path, monkeypatch):
    full = {k: v.float() for k, v in released.state_dict().items()}
    heads = {"pretrain": ("mlm_score.", "itm_score."), "vqa": ("vqa_classifier.",),
             "retrieval": ("itm_score.", "cross_modal_itc_", "rank_output.")}[kind]
    all_heads = ("mlm_score.", "itm_score.", "cross_modal_itc_", "vqa_classifier.", "rank_output.")
    state = {k: v for k, v in full.items() if not k.startswith(all_heads) or k.startswith(heads)}
    state["text_transformer.embeddings.position_ids"] = torch.arange(64)[None]  # older transformers saved it
    ckpt = lightning_checkpoint(tmp_path / "released.ckpt", state, HPARAMS, monkeypatch)
    answers = ["yes", "no", "2", "red", "cat"]
    options = {}
    if kind == "vqa":
        (tmp_path / "labels.json").write_text(json.dumps(answers))
        (tmp_path / "ours.json").write_text(json.dumps(["cat", "dog", "yes", "2"]))  # reordered, one new, two gone
        options = dict(vqa_labels=str(tmp_path / "labels.json"), answer_vocab=str(tmp_path / "ours.json"))
    done = convert_checkpoint(ckpt, tmp_path / "out", tokenizer_dir=str(tiny_tokenizer_dir(tmp_path)), **options)
    report = every_key_accounted(tmp_path / "out", state)
    assert done.format == "released-mt" and done.model.manager == "aaue_fused" and done.model.num_experts == 2
    assert done.model.vision_config == {"head_width": 64} and done.model.text_config == {}
    assert done.task == {"pretrain": "pretrain", "vqa": "vqav2", "retrieval": None}[kind]
    assert "model.vision_config={\"head_width\": 64}" in done.finetune_overrides
    assert json.loads((tmp_path / "out" / "config.json").read_text())["step"] == 1234
    assert "text_transformer.pooler.dense.weight" in report["dropped"]
    assert "text_transformer.embeddings.position_ids" in report["dropped"]
    assert "vit_model.ln_final.weight" in report["dropped"] and "vit_model.positional_embedding" in report["dropped"]
    assert "cross_modal_text_manager_tower.1.manager_layer.softmax_temperature_cross" in report["dropped"]

    tower = ManagerTower.from_pretrained(tmp_path / "out").double()
    out, _ = read_folder(tmp_path / "out")
    ids, mask = text_inputs(274, pad=0, bos=2, eos=3, length=9)
    pix = pixels(64)
    with torch.no_grad():
        ours, (x, y, cls) = tower(ids, mask, pix), released.infer(ids, mask, pix)
        torch.testing.assert_close(ours.text, x, **TOL)
        torch.testing.assert_close(ours.image, y, **TOL)
        torch.testing.assert_close(ours.cls_feats, cls, **TOL)
        if kind == "pretrain":
            assert "temperature" in report["dropped"]  # no ITC heads: the released temperature is unused
            logits, _ = head(MLMHead, out, "mlm_head.", 64, 274)(ours.text)
            torch.testing.assert_close(logits, released.mlm(x), **TOL)
            torch.testing.assert_close(head(ITMHead, out, "itm_head.", 64)(ours.cls_feats),
                                       released.itm_score.fc(cls), **TOL)
        if kind == "vqa":
            from managertower.model import ClassifierHead

            logits = head(ClassifierHead, out, "classifier.", 128, 256, 4)(ours.cls_feats)
            theirs = released.vqa_classifier(cls)
            for row, answer in enumerate(["cat", "dog", "yes", "2"]):
                if answer in answers:
                    torch.testing.assert_close(logits[:, row], theirs[:, answers.index(answer)], **TOL)
            assert torch.all(out["classifier.fc2.bias"][1] == 0)  # "dog" starts new
            assert json.loads((tmp_path / "out" / "answer_vocab.json").read_text()) == ["cat", "dog", "yes", "2"]
            assert any(o.startswith("task.answer_vocab=") for o in done.finetune_overrides)
        if kind == "retrieval":
            assert "rank_output.weight" in report["dropped"]
            itc = head(ITCHead, out, "itc_head.", 64, 64, 16)
            text, image = released.uni_modal(ids, mask, pix)
            t, i = itc(text[:, -1, 0], image[:, -1, 0])
            torch.testing.assert_close(t, F.normalize(released.cross_modal_itc_text_head.fc(text[:, -1, 0]), dim=-1),
                                       **TOL)
            torch.testing.assert_close(i, F.normalize(released.cross_modal_itc_image_head.fc(image[:, -1, 0]),
                                                      dim=-1), **TOL)
            assert itc.temperature().item() == pytest.approx(released.temperature.item())
            assert "task.itc_dim=16" in done.finetune_overrides


def released_bt_state(model) -> dict:
    """transformers' BridgeTower tensors under the released bt_module.py names (written out here, independently
    of the converter's table), with the released checkpoint's extra keys."""
    out = {}
    for key, value in model.state_dict().items():
        key = key.removeprefix("bridgetower.")
        key = key.replace("text_model.", "text_transformer.", 1).replace("vision_model.visual.", "vit_model.visual.")
        key = (key.replace("embeddings.patch_embedding.weight", "conv1.weight")
               .replace("embeddings.class_embedding", "class_embedding")
               .replace("embeddings.position_embedding.weight", "positional_embedding"))
        out[key] = value
    out["vit_model.positional_embedding"] = torch.zeros(77, 32)  # the released CLIP wrapper's text side
    out["vit_model.ln_final.weight"], out["vit_model.ln_final.bias"] = torch.ones(32), torch.zeros(32)
    out["temperature"] = torch.tensor(0.07)
    for i in range(HF_VISION["num_hidden_layers"]):  # vit_layernorm_shared=False: unused by infer
        out[f"vit_model.visual.ln_separate.{i}.weight"], out[f"vit_model.visual.ln_separate.{i}.bias"] = \
            torch.ones(64), torch.zeros(64)
    return out


def test_released_bt_checkpoint_converts_exactly_and_bad_keys_are_named(tmp_path, monkeypatch):
    """A released BridgeTower checkpoint (one head per 64 channels, as the released experts: no tokenizer folder
    is needed to tell the heads) converts to transformers' numbers; a missing or an unknown key is one error."""
    from transformers import BridgeTowerForMaskedLM

    model = redraw(BridgeTowerForMaskedLM(hf_config(heads=1)), 11)
    state = released_bt_state(model)
    ckpt = lightning_checkpoint(tmp_path / "bt.ckpt", state, {"tokenizer": "roberta-base", "num_heads": 1,
                                                              "image_size": 32}, monkeypatch)
    done = convert_checkpoint(ckpt, tmp_path / "out", "released-bt")
    report = every_key_accounted(tmp_path / "out", state)
    assert done.model.manager == "bridgetower" and done.task == "pretrain"
    assert "vit_model.visual.ln_separate.0.weight" in report["dropped"] and "temperature" in report["dropped"]
    model.double().eval()
    released_eps(model)
    tower = ManagerTower.from_pretrained(tmp_path / "out").double()
    ids, mask = text_inputs(99, pad=1, bos=0, eos=2)
    pix = pixels(32)
    with torch.no_grad():
        ours = tower(ids, mask, pix)
        theirs = model.bridgetower(input_ids=ids, attention_mask=mask, pixel_values=pix)
        torch.testing.assert_close(ours.cls_feats, theirs.pooler_output, **TOL)
        out, _ = read_folder(tmp_path / "out")
        logits, _ = head(MLMHead, out, "mlm_head.", 64, 99)(ours.text)
        torch.testing.assert_close(logits, model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits, **TOL)

    missing = {k: v for k, v in state.items() if k != "cross_modal_text_layers.1.output.dense.weight"}
    torch.save({"state_dict": missing}, tmp_path / "missing.pt")
    with pytest.raises(ConversionError, match=r"lacks 1 tensors of the tower: model\.text_layers\.1\.ffn_out\.weight"):
        convert_checkpoint(tmp_path / "missing.pt", tmp_path / "x")
    torch.save({"state_dict": {**state, "cross_modal_text_layers.0.adapter.weight": torch.zeros(2)}},
               tmp_path / "unknown.pt")
    with pytest.raises(ConversionError, match=r"neither mapped nor known to be unused: "
                                              r"cross_modal_text_layers\.0\.adapter\.weight"):
        convert_checkpoint(tmp_path / "unknown.pt", tmp_path / "x")
    with pytest.raises(ConversionError, match="holds released-bt names, not released-mt"):
        convert_checkpoint(tmp_path / "missing.pt", tmp_path / "x", "released-mt")
    with pytest.raises(ConversionError, match="VQAv2 classifier.*--vqa-labels"):
        from managertower.convert import map_answer_rows
        map_answer_rows({}, None, None, [])


def test_the_door_prints_the_overrides_and_one_line_errors(released, tmp_path, monkeypatch, capsys):
    from doors.convert import main

    state = {k: v.float() for k, v in released.state_dict().items() if not k.startswith("vqa_classifier.")}
    ckpt = lightning_checkpoint(tmp_path / "mt.ckpt", state, HPARAMS, monkeypatch)
    assert main([str(ckpt), "--out", str(tmp_path / "out"), "--tokenizer-dir", str(tiny_tokenizer_dir(tmp_path))]) == 0
    printed = capsys.readouterr().out
    assert "released-mt" in printed and "model.vision_config=" in printed
    assert f"--from {tmp_path / 'out' / 'model.safetensors'}" in printed
    assert main([str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# --- no pickle ----------------------------------------------------------------------------------------------------
def test_weights_folders_load_without_unpickling(released, tmp_path, monkeypatch):
    state = {k: v.float() for k, v in released.state_dict().items() if not k.startswith("vqa_classifier.")}
    torch.save({"state_dict": state}, tmp_path / "mt.pt")
    convert_checkpoint(tmp_path / "mt.pt", tmp_path / "out", tokenizer_dir=str(tiny_tokenizer_dir(tmp_path)))

    def refuse(*args, **kwargs):
        raise AssertionError("a weights folder was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    tower = ManagerTower.from_pretrained(tmp_path / "out")
    assert tower.cfg.tokenizer == str(tmp_path / "out")
    state_read, config = read_folder(tmp_path / "out" / "model.safetensors")
    assert config["format"] == "managertower" and "model.text_proj.weight" in state_read
    from managertower.engine.checkpoint import load_weights_file

    for given in (tmp_path / "out", tmp_path / "out" / "model.safetensors"):  # --from / checkpoint.init_from
        weights, run_config = load_weights_file(given)
        assert run_config["model"]["manager"] == "aaue_fused" and weights.keys() == state_read.keys()


class Payload:
    """Unpickling this opens (creates) a file: code that must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_pickled_payload_is_refused_before_it_runs(tmp_path):
    from managertower.engine.checkpoint import UnsafeCheckpoint, load_weights_file

    marker = tmp_path / "ran"
    torch.save({"state_dict": {"temperature": torch.zeros(())}, "hyper_parameters": Payload(marker)},
               tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpoint, match=r"evil\.ckpt holds pickled Python objects \(io\.open\)"):
        convert_checkpoint(tmp_path / "evil.ckpt", tmp_path / "out")
    with pytest.raises(UnsafeCheckpoint):
        load_weights_file(tmp_path / "evil.ckpt")
    assert not marker.exists()
