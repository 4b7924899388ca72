"""Building blocks for the test-fixture generator (``make_fixtures.py``).

Everything here is deterministic: the synthetic test images are defined by a formula,
the synthetic tokenizer's merges are learned from a corpus generated from a fixed seed,
and the tiny models are drawn from seeded generators.

Only the generators (and the throughput benchmark, for `import_torch`) import this module;
the project's tests never need torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter

import numpy as np

_TORCHVISION_SCHEMAS: list = []


def import_torch():
    """Imports torch and torchvision (which transformers' image processor needs) and returns
    torch. Where only a CUDA-linked torchvision wheel sits next to a CPU torch, its C
    extension cannot load and the import fails on the missing torchvision::nms / ::qnms
    schemas; declaring them lets the pure-Python transforms import."""
    import sys

    import torch

    try:
        import torchvision
    except RuntimeError:
        for m in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[m]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
        _TORCHVISION_SCHEMAS.append(lib)  # the definitions live as long as the Library object
    return torch


# --------------------------------------------------------------------------------------
# test images
# --------------------------------------------------------------------------------------


def grad_image(width: int, height: int) -> np.ndarray:
    """The ``"grad"`` test pattern: an ``height x width x 3`` uint8 RGB array.

    For the pixel at column ``x`` and row ``y``::

        R = (x * 255) // max(W - 1, 1)
        G = (y * 255) // max(H - 1, 1)
        B = ((x * 7 + y * 13) ^ (x * y)) & 255

    (integer arithmetic; ``^`` is bitwise xor). R ramps left to right, G top to bottom and
    B carries high-frequency detail so resampling differences show up.
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    r = (x * 255) // max(width - 1, 1)
    g = (y * 255) // max(height - 1, 1)
    b = ((x * 7 + y * 13) ^ (x * y)) & 255
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def image_spec(width: int, height: int) -> dict:
    return {"pattern": "grad", "width": width, "height": height}


# --------------------------------------------------------------------------------------
# synthetic tokenizer: real LFM2-VL special-token ids, byte-level BPE with real merges
# --------------------------------------------------------------------------------------

NUM_SPECIAL = 512  # ids 0..511: special / reserved tokens
BYTE_BASE = 512  # ids 512..767: the 256 ByteLevel byte symbols
MERGE_BASE = 768  # ids 768..vocab-1: one token per learned merge

SPECIAL_TOKENS: dict[int, str] = {
    0: "<|pad|>",
    1: "<|startoftext|>",
    2: "<|endoftext|>",
    6: "<|im_start|>",
    7: "<|im_end|>",
    8: "<|tool_list_start|>",
    9: "<|tool_list_end|>",
    10: "<|tool_call_start|>",
    11: "<|tool_call_end|>",
    12: "<|tool_response_start|>",
    13: "<|tool_response_end|>",
    396: "<image>",
    497: "<|img_thumbnail|>",
    498: "<|image_start|>",
    499: "<|image_end|>",
}
for _r in range(1, 11):
    for _c in range(1, 11):
        SPECIAL_TOKENS[397 + (_r - 1) * 10 + (_c - 1)] = f"<|img_row_{_r}_col_{_c}|>"


def special_token(i: int) -> str:
    return SPECIAL_TOKENS.get(i, f"<|reserved_{i}|>")


_SUBJECTS = ["the cat", "a dog", "the small bird", "my friend", "the old man", "a young woman",
             "the red car", "this picture", "the photo", "a tall tree", "the river", "our team",
             "the teacher", "a child", "the city", "the image", "the model", "a blue house"]
_VERBS = ["is", "was", "looks", "shows", "has", "sees", "holds", "makes", "finds", "gives",
          "describes", "contains", "walks near", "stands by", "runs to", "sits on"]
_OBJECTS = ["a green field", "the window", "two apples", "an open door", "the mountain",
            "some water", "a bright light", "three people", "the table", "a white wall",
            "the evening sky", "many books", "the street", "a wooden chair", "the answer",
            "an interesting question", "the sunset", "a large building"]
_TAILS = ["", " today", " in the morning", " at night", " again", " with care",
          " near the station", " during the summer", " for a while", " and then leaves"]
_QUESTIONS = ["What is in this image?", "Describe this image.", "What color is the car?",
              "How many people are there?", "What is 2+2?", "Where is the dog?",
              "Can you read the text?", "Is it raining?", "Why is the sky blue?"]


def training_corpus(seed: int = 1234, sentences: int = 1500) -> str:
    """A small, fixed English corpus (sentences, questions, numbers, a little code and
    JSON-ish text), generated from ``seed``."""
    rng = random.Random(seed)
    lines = []
    for i in range(sentences):
        kind = rng.random()
        if kind < 0.6:
            s = (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
                 f"{rng.choice(_TAILS)}.")
            s = s[0].upper() + s[1:]
        elif kind < 0.8:
            s = rng.choice(_QUESTIONS)
        elif kind < 0.9:
            a, b = rng.randint(0, 999), rng.randint(0, 99)
            s = f"The answer is {a + b}, because {a} + {b} = {a + b}."
        else:
            s = (f'{{"name": "{rng.choice(_OBJECTS).split()[-1]}", "count": {rng.randint(1, 50)}, '
                 f'"visible": {"true" if rng.random() < 0.5 else "false"}}}')
        lines.append(s)
    return "\n".join(lines) + "\n"


def learn_bpe_merges(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Classic BPE merge learning over ByteLevel pre-tokenized words.

    Deterministic: the most frequent adjacent pair wins, ties broken by the
    lexicographically smallest pair. Returns the merges in order."""
    from tokenizers.pre_tokenizers import ByteLevel

    pre = ByteLevel(add_prefix_space=False, use_regex=True)
    freqs = Counter(w for w, _ in pre.pre_tokenize_str(corpus))
    words = [(list(w), f) for w, f in sorted(freqs.items())]
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter = Counter()
        for syms, f in words:
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += f
        if not pairs:
            raise RuntimeError("corpus too small for the requested number of merges")
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        for syms, _ in words:
            i = 0
            while i < len(syms) - 1:
                if syms[i] == best[0] and syms[i + 1] == best[1]:
                    syms[i:i + 2] = [joined]
                else:
                    i += 1
    return merges


def build_tokenizer(vocab_size: int, merges: list[tuple[str, str]]):
    """A ``tokenizers.Tokenizer``: ids 0..511 specials (real LFM2-VL ids where known,
    ``<|reserved_N|>`` otherwise, all flagged special), 512..767 the ByteLevel byte
    alphabet (ordered by code point), 768.. the first ``vocab_size - 768`` merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    n_merges = vocab_size - MERGE_BASE
    assert 0 <= n_merges <= len(merges)
    vocab: dict[str, int] = {special_token(i): i for i in range(NUM_SPECIAL)}
    for j, ch in enumerate(sorted(ByteLevel.alphabet())):
        vocab[ch] = BYTE_BASE + j
    used = merges[:n_merges]
    for k, (a, b) in enumerate(used):
        tok = a + b
        assert tok not in vocab, f"merge result collides with an existing token: {tok!r}"
        vocab[tok] = MERGE_BASE + k
    assert len(vocab) == vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(used), fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(special_token(i), special=True, normalized=False)
                            for i in range(NUM_SPECIAL)])
    return tok


def hf_tokenizer(tokenizer_json_path: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=tokenizer_json_path, bos_token="<|startoftext|>",
                                   eos_token="<|im_end|>", pad_token="<|pad|>")


# --------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------

REAL_LAYER_TYPES = ["conv", "conv", "full_attention", "conv", "conv", "full_attention", "conv",
                    "conv", "full_attention", "conv", "full_attention", "conv", "full_attention",
                    "conv", "full_attention", "conv"]

MODEL_SPECS = {
    "tiny16": dict(hidden=64, heads=4, kv_heads=2, layer_types=REAL_LAYER_TYPES, vocab=1024,
                   vision_hidden=32, vision_layers=2, projector_hidden=128, seed=16),
    "tiny6": dict(hidden=96, heads=4, kv_heads=1,
                  layer_types=["conv", "conv", "full_attention", "conv", "full_attention", "conv"],
                  vocab=896, vision_hidden=32, vision_layers=1, projector_hidden=192, seed=6),
}


def tiny_config(spec: dict):
    from transformers import Lfm2VlConfig

    h = spec["hidden"]
    text = dict(
        model_type="lfm2", hidden_size=h, intermediate_size=2 * h,
        num_hidden_layers=len(spec["layer_types"]), num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"], layer_types=list(spec["layer_types"]),
        conv_L_cache=3, conv_bias=False, vocab_size=spec["vocab"],
        max_position_embeddings=128000, norm_eps=1e-5,
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
        block_auto_adjust_ff_dim=True, block_ffn_dim_multiplier=1.0, block_multiple_of=32,
        eos_token_id=7, pad_token_id=0, bos_token_id=1,
    )
    vh = spec["vision_hidden"]
    vision = dict(
        model_type="siglip2_vision_model", hidden_size=vh, intermediate_size=2 * vh,
        num_hidden_layers=spec["vision_layers"], num_attention_heads=2, num_channels=3,
        num_patches=256, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        attention_dropout=0.0, vision_use_head=False,
    )
    return Lfm2VlConfig(
        text_config=text, vision_config=vision, image_token_id=396, downsample_factor=2,
        projector_hidden_act="gelu", projector_hidden_size=spec["projector_hidden"],
        projector_bias=True, projector_use_layernorm=False, tie_word_embeddings=True,
    )


def build_model(spec: dict):
    """The tiny model of ``spec`` (see ``init_model``)."""
    return init_model(tiny_config(spec), spec["seed"])


def init_model(cfg, seed: int):
    """fp32, eager attention, weights redrawn N(0, 1/sqrt(fan_in)) (biases N(0, 0.02)) so
    logits have std ~1 and greedy decoding has no near-ties between runtimes. Also used at
    the real size by ``make_bench_model.py``."""
    import torch
    from transformers import Lfm2VlForConditionalGeneration

    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Lfm2VlForConditionalGeneration(cfg).eval().float()
    gen = torch.Generator().manual_seed(seed * 1000 + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.tie_weights()
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 7
    model.generation_config.pad_token_id = 0
    return model


# --------------------------------------------------------------------------------------
# export wrappers (official LFM2.5-VL-450M-ONNX I/O contract)
# --------------------------------------------------------------------------------------


def _wrappers():
    import torch
    import torch.nn.functional as F
    from torch import nn
    from transformers.models.lfm2.modeling_lfm2 import apply_rotary_pos_emb, repeat_kv

    class EmbedTokens(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.embed = model.model.language_model.embed_tokens

        def forward(self, input_ids):
            return self.embed(input_ids)

    class VisionEncoder(nn.Module):
        """Vision tower + pixel-unshuffle + projector, real tokens only, entries in order.
        Same computation as Lfm2VlModel.get_image_features followed by torch.cat, with no
        data-dependent Python split (so the trace stays shape-generic)."""

        def __init__(self, model):
            super().__init__()
            self.m = model.model
            self.k = model.config.downsample_factor

        def forward(self, pixel_values, pixel_attention_mask, spatial_shapes):
            hidden = self.m.vision_tower(pixel_values=pixel_values, spatial_shapes=spatial_shapes,
                                         pixel_attention_mask=pixel_attention_mask,
                                         return_dict=True).last_hidden_state
            n_img, n_patch, width = hidden.shape
            k = self.k
            gw = spatial_shapes[:, 1, None]  # patch-grid width per entry
            per_row = gw // k
            n_tok = (spatial_shapes[:, 0, None] // k) * per_row
            tok = torch.arange(n_patch // (k * k))[None]
            off = torch.arange(k)
            r = (tok // per_row * k)[..., None, None] + off[:, None]
            c = (tok % per_row * k)[..., None, None] + off
            base = torch.arange(n_img)[:, None, None, None] * n_patch
            idx = base + r * gw[..., None, None] + c
            real = tok < n_tok
            idx = idx.masked_fill(~real[..., None, None], 0)
            idx = idx.flatten(0, 1).permute(1, 0, 2).reshape(k, -1)
            grid = hidden.reshape(-1, width)[idx]
            feats = self.m.multi_modal_projector(grid.unsqueeze(0))
            return feats.reshape(-1, feats.shape[-1])[real.flatten()]

    class DecoderMerged(nn.Module):
        """Hybrid conv/attention decoder with the cache threaded as explicit tensors.
        Positions are implicit: past_len .. total-1 where past_len = T - S."""

        def __init__(self, model):
            super().__init__()
            self.lm = model.model.language_model
            self.lm_head = model.lm_head
            self.types = list(self.lm.config.layer_types)
            self.L = self.lm.config.conv_L_cache

        def forward(self, inputs_embeds, attention_mask, *past):
            B, S, _ = inputs_embeds.shape
            T = attention_mask.shape[1]
            pos = torch.arange(S) + (T - S)
            allowed = (torch.arange(T)[None, :] <= pos[:, None])[None, None] \
                & (attention_mask[:, None, None, :] > 0)
            dt = inputs_embeds.dtype
            bias = torch.where(allowed, torch.zeros((), dtype=dt),
                               torch.full((), torch.finfo(dt).min, dtype=dt))
            step_mask = attention_mask[:, -S:].to(dt)[:, :, None]
            h = inputs_embeds
            cos, sin = self.lm.rotary_emb(h, position_ids=pos[None])
            presents, j = [], 0
            for i, layer in enumerate(self.lm.layers):
                x = layer.operator_norm(h)
                if self.types[i] == "conv":
                    conv = layer.conv
                    bcx = conv.in_proj(x * step_mask).transpose(-1, -2)
                    b, cgate, xx = bcx.chunk(3, dim=-2)
                    full = torch.cat([past[j], b * xx], dim=-1)
                    j += 1
                    presents.append(full[:, :, -self.L:])
                    y = F.conv1d(full, conv.conv.weight, conv.conv.bias,
                                 groups=full.shape[1])[:, :, -S:]
                    x = conv.out_proj((cgate * y).transpose(-1, -2).contiguous())
                else:
                    att = layer.self_attn
                    hd = att.head_dim
                    q = att.q_layernorm(att.q_proj(x).view(B, S, -1, hd)).transpose(1, 2)
                    kk = att.k_layernorm(att.k_proj(x).view(B, S, -1, hd)).transpose(1, 2)
                    v = att.v_proj(x).view(B, S, -1, hd).transpose(1, 2)
                    q, kk = apply_rotary_pos_emb(q, kk, cos, sin)
                    kk = torch.cat([past[j], kk], dim=2)
                    v = torch.cat([past[j + 1], v], dim=2)
                    j += 2
                    presents += [kk, v]
                    w = torch.matmul(q, repeat_kv(kk, att.num_key_value_groups).transpose(2, 3))
                    w = torch.softmax(w * att.scaling + bias, dim=-1)
                    o = torch.matmul(w, repeat_kv(v, att.num_key_value_groups))
                    x = att.out_proj(o.transpose(1, 2).reshape(B, S, -1))
                h = h + x
                h = h + layer.feed_forward(layer.ffn_norm(h))
            return (self.lm_head(self.lm.embedding_norm(h)), *presents)

    return EmbedTokens, VisionEncoder, DecoderMerged


def decoder_io_names(layer_types):
    ins, outs = ["inputs_embeds", "attention_mask"], ["logits"]
    for i, t in enumerate(layer_types):
        if t == "conv":
            ins.append(f"past_conv.{i}")
            outs.append(f"present_conv.{i}")
        else:
            ins += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs


# official symbolic dim names; None = fixed width left as exported
_DIMS = {
    "input_ids": ["batch_size", "sequence_length"],
    "inputs_embeds": ["batch_size", "sequence_length", None],
    "pixel_values": ["batch_size", "num_patches", None],
    "pixel_attention_mask": ["batch_size", "num_patches"],
    "spatial_shapes": ["batch_size", None],
    "image_features": ["num_image_tokens", None],
    "attention_mask": ["batch_size", "total_sequence_length"],
    "logits": ["batch_size", "sequence_length", None],
}


def _official_dims(name):
    if name in _DIMS:
        return _DIMS[name]
    if name.startswith(("past_conv.", "present_conv.")):
        return ["batch_size", None, None]
    if name.startswith("past_key_values."):
        return ["batch_size", None, "past_sequence_length", None]
    if name.startswith("present."):
        return ["batch_size", None, "total_sequence_length", None]
    return None


def _finalize_onnx(path):
    """Rename symbolic dims to the official names; fix widths to concrete values; save as a
    single protobuf (no external data)."""
    import onnx

    m = onnx.load(path)
    for v in list(m.graph.input) + list(m.graph.output):
        want = _official_dims(v.name)
        if want is None:
            continue
        for d, w in zip(v.type.tensor_type.shape.dim, want):
            if w is not None:
                d.Clear()
                d.dim_param = w
    m.producer_name = "lfm-fixtures"
    onnx.checker.check_model(m)
    onnx.save(m, path, save_as_external_data=False)


def _decoder_export_args(tc, g):
    """Input/output names, example inputs (a 3-position cache; drawn from ``g`` in the
    order the exports always drew them) and dynamic axes of ``decoder_model_merged.onnx``."""
    import torch

    ins, outs = decoder_io_names(tc.layer_types)
    hd = tc.hidden_size // tc.num_attention_heads
    past = []
    for t in tc.layer_types:
        if t == "conv":
            past.append(torch.randn(1, tc.hidden_size, tc.conv_L_cache, generator=g))
        else:
            past += [torch.randn(1, tc.num_key_value_heads, 3, hd, generator=g) for _ in range(2)]
    example = (torch.randn(1, 2, tc.hidden_size, generator=g), torch.ones(1, 5, dtype=torch.long), *past)
    dyn = {"inputs_embeds": {0: "batch_size", 1: "sequence_length"},
           "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
           "logits": {0: "batch_size", 1: "sequence_length"}}
    for n in ins[2:]:
        dyn[n] = {0: "batch_size"} if n.startswith("past_conv") else \
            {0: "batch_size", 2: "past_sequence_length"}
    for n in outs[1:]:
        dyn[n] = {0: "batch_size"} if n.startswith("present_conv") else \
            {0: "batch_size", 2: "total_sequence_length"}
    return ins, outs, example, dyn


def export_onnx(model, outdir: str, opset: int = 18):
    """Export the three graphs with the legacy (TorchScript) exporter."""
    import warnings

    import torch

    EmbedTokens, VisionEncoder, DecoderMerged = _wrappers()
    tc = model.config.text_config
    os.makedirs(outdir, exist_ok=True)
    common = dict(opset_version=opset, dynamo=False, do_constant_folding=True)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)

    p = os.path.join(outdir, "embed_tokens.onnx")
    torch.onnx.export(
        EmbedTokens(model).eval(), (torch.tensor([[1, 6, 520, 521, 396, 396, 7]]),), p,
        input_names=["input_ids"], output_names=["inputs_embeds"],
        dynamic_axes={"input_ids": {0: "batch_size", 1: "sequence_length"},
                      "inputs_embeds": {0: "batch_size", 1: "sequence_length"}}, **common)
    _finalize_onnx(p)

    g = torch.Generator().manual_seed(0)
    pv = torch.randn(2, 1024, 768, generator=g)
    pam = torch.zeros(2, 1024, dtype=torch.long)
    pam[0, :32 * 32] = 1
    pam[1, :26 * 36] = 1
    sp = torch.tensor([[32, 32], [26, 36]])
    p = os.path.join(outdir, "vision_encoder.onnx")
    torch.onnx.export(
        VisionEncoder(model).eval(), (pv, pam, sp), p,
        input_names=["pixel_values", "pixel_attention_mask", "spatial_shapes"],
        output_names=["image_features"],
        dynamic_axes={"pixel_values": {0: "batch_size", 1: "num_patches"},
                      "pixel_attention_mask": {0: "batch_size", 1: "num_patches"},
                      "spatial_shapes": {0: "batch_size"},
                      "image_features": {0: "num_image_tokens"}}, **common)
    _finalize_onnx(p)

    ins, outs, example, dyn = _decoder_export_args(tc, g)
    p = os.path.join(outdir, "decoder_model_merged.onnx")
    torch.onnx.export(
        DecoderMerged(model).eval(),
        example,
        p, input_names=ins, output_names=outs, dynamic_axes=dyn, **common)
    _finalize_onnx(p)


# --------------------------------------------------------------------------------------
# variant: decoder attention through com.microsoft.GroupQueryAttention (as the official export)
# --------------------------------------------------------------------------------------

# Variants reuse a base model's spec and seed (so the same weights and the same goldens) and
# replace only the decoder graph. The base's other files are copied unchanged.
VARIANT_SPECS = {
    "tiny16-gqa": dict(MODEL_SPECS["tiny16"], base="tiny16", attention="gqa"),
}

# Rows of the GQA cos/sin caches: the largest total sequence length (past + new) the graph
# accepts. The longest golden prompt is 1801 tokens (+ 24 new).
GQA_ROPE_POSITIONS = 2048


def _gqa_function():
    import torch

    class GroupQueryAttention(torch.autograd.Function):
        """Exports as one ``com.microsoft::GroupQueryAttention`` node (opset 1). The eager
        forward is the op's semantics for an all-ones mask on a batch of one length (past =
        total - S, positions past..total-1), so the traced shapes are right; the values of
        the trace are not used."""

        @staticmethod
        def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache,
                    num_heads, kv_num_heads, scale):
            from transformers.models.lfm2.modeling_lfm2 import repeat_kv, rotate_half

            B, S, _ = q.shape
            D = past_k.shape[-1]
            P = past_k.shape[2]
            pos = torch.arange(P, P + S)
            cos = torch.cat([cos_cache[pos], cos_cache[pos]], -1)[None, None]
            sin = torch.cat([sin_cache[pos], sin_cache[pos]], -1)[None, None]
            qh = q.view(B, S, num_heads, D).transpose(1, 2)
            kh = k.view(B, S, kv_num_heads, D).transpose(1, 2)
            vh = v.view(B, S, kv_num_heads, D).transpose(1, 2)
            qh = qh * cos + rotate_half(qh) * sin
            kh = kh * cos + rotate_half(kh) * sin
            kk = torch.cat([past_k, kh], 2)
            vv = torch.cat([past_v, vh], 2)
            T = P + S
            causal = torch.arange(T)[None, :] <= pos[:, None]
            w = torch.matmul(qh, repeat_kv(kk, num_heads // kv_num_heads).transpose(2, 3)) * scale
            w = torch.softmax(w.masked_fill(~causal, float("-inf")), -1)
            o = torch.matmul(w, repeat_kv(vv, num_heads // kv_num_heads))
            return o.transpose(1, 2).reshape(B, S, num_heads * D), kk, vv

        @staticmethod
        def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache,
                     num_heads, kv_num_heads, scale):
            out, pk, pv = g.op("com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v,
                               seqlens_k, total_len, cos_cache, sin_cache,
                               num_heads_i=num_heads, kv_num_heads_i=kv_num_heads, scale_f=scale,
                               do_rotary_i=1, rotary_interleaved_i=0, local_window_size_i=-1,
                               softcap_f=0.0, outputs=3)
            out.setType(q.type())
            pk.setType(past_k.type())
            pv.setType(past_v.type())
            return out, pk, pv

    return GroupQueryAttention


def _gqa_decoder_wrapper():
    import torch
    import torch.nn.functional as F
    from torch import nn

    GroupQueryAttention = _gqa_function()

    class DecoderMergedGQA(nn.Module):
        """The official export's decoder computation: no position_ids; per attention layer
        q/k/v projections, per-head q/k RMSNorm, then GroupQueryAttention (RoPE inside, from
        cos/sin cache initializers) fed ``seqlens_k = int32(ReduceSum(mask, 1) - 1)`` and
        ``total_sequence_length = int32(Shape(mask)[1])``; conv layers unmasked, their cache
        the last conv_L_cache columns of concat(past_conv, B*x)."""

        def __init__(self, model, max_positions):
            super().__init__()
            self.lm = model.model.language_model
            self.lm_head = model.lm_head
            self.types = list(self.lm.config.layer_types)
            self.L = self.lm.config.conv_L_cache
            tc = self.lm.config
            hd = tc.hidden_size // tc.num_attention_heads
            theta = tc.rope_parameters["rope_theta"]
            inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
            freqs = torch.outer(torch.arange(max_positions, dtype=torch.int64).float(), inv_freq)
            self.register_buffer("cos_cache", freqs.cos().contiguous())
            self.register_buffer("sin_cache", freqs.sin().contiguous())

        def forward(self, inputs_embeds, attention_mask, *past):
            B, S, _ = inputs_embeds.shape
            seqlens_k = (attention_mask.sum(1) - 1).to(torch.int32)
            total_len = torch._shape_as_tensor(attention_mask)[1].to(torch.int32)
            h = inputs_embeds
            presents, j = [], 0
            for i, layer in enumerate(self.lm.layers):
                x = layer.operator_norm(h)
                if self.types[i] == "conv":
                    conv = layer.conv
                    bcx = conv.in_proj(x).transpose(-1, -2)
                    b, cgate, xx = bcx.chunk(3, dim=-2)
                    full = torch.cat([past[j], b * xx], dim=-1)
                    j += 1
                    presents.append(full[:, :, -self.L:])
                    y = F.conv1d(full, conv.conv.weight, conv.conv.bias,
                                 groups=full.shape[1])[:, :, -S:]
                    x = conv.out_proj((cgate * y).transpose(-1, -2).contiguous())
                else:
                    att = layer.self_attn
                    hd = att.head_dim
                    nh = att.q_proj.out_features // hd
                    nkv = att.k_proj.out_features // hd
                    q = att.q_layernorm(att.q_proj(x).view(B, S, nh, hd)).reshape(B, S, nh * hd)
                    k = att.k_layernorm(att.k_proj(x).view(B, S, nkv, hd)).reshape(B, S, nkv * hd)
                    v = att.v_proj(x)
                    o, kk, vv = GroupQueryAttention.apply(
                        q, k, v, past[j], past[j + 1], seqlens_k, total_len, self.cos_cache,
                        self.sin_cache, nh, nkv, float(att.scaling))
                    j += 2
                    presents += [kk, vv]
                    x = att.out_proj(o)
                h = h + x
                h = h + layer.feed_forward(layer.ffn_norm(h))
            return (self.lm_head(self.lm.embedding_norm(h)), *presents)

    return DecoderMergedGQA


def export_gqa_decoder(model, outdir: str, opset: int = 18, max_positions: int = GQA_ROPE_POSITIONS):
    """Export only ``decoder_model_merged.onnx`` of the GQA variant (legacy exporter, same
    inputs, outputs, dims and example inputs as ``export_onnx``'s decoder)."""
    import warnings

    import torch

    DecoderMergedGQA = _gqa_decoder_wrapper()
    tc = model.config.text_config
    os.makedirs(outdir, exist_ok=True)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    g = torch.Generator().manual_seed(0)
    ins, outs, example, dyn = _decoder_export_args(tc, g)
    p = os.path.join(outdir, "decoder_model_merged.onnx")
    torch.onnx.export(
        DecoderMergedGQA(model, max_positions).eval(),
        example,
        p, input_names=ins, output_names=outs, dynamic_axes=dyn, opset_version=opset, dynamo=False,
        do_constant_folding=True, custom_opsets={"com.microsoft": 1})
    _finalize_onnx(p)


def describe_onnx(path):
    import onnx

    m = onnx.load(path, load_external_data=False)
    types = {1: "float32", 7: "int64"}

    def d(v):
        tt = v.type.tensor_type
        return {"name": v.name, "dtype": types.get(tt.elem_type, str(tt.elem_type)),
                "shape": [x.dim_param or x.dim_value for x in tt.shape.dim]}
    return {"inputs": [d(i) for i in m.graph.input], "outputs": [d(o) for o in m.graph.output],
            "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import}}


# --------------------------------------------------------------------------------------
# onnxruntime greedy loop (export sanity check only; never a golden source)
# --------------------------------------------------------------------------------------


class OrtRunner:
    def __init__(self, onnx_dir: str, image_token_id: int = 396):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        prov = ["CPUExecutionProvider"]

        def sess(n):
            return ort.InferenceSession(os.path.join(onnx_dir, n), so, providers=prov)
        self.vision = sess("vision_encoder.onnx")
        self.embed = sess("embed_tokens.onnx")
        self.dec = sess("decoder_model_merged.onnx")
        self.out_names = [o.name for o in self.dec.get_outputs()]
        self.image_token_id = image_token_id

    def _empty_cache(self):
        cache = {}
        for i in self.dec.get_inputs()[2:]:
            shape = [1 if s == "batch_size" else (0 if isinstance(s, str) else s) for s in i.shape]
            cache[i.name] = np.zeros(shape, np.float32)
        return cache

    def image_features(self, pixel_values, mask, spatial):
        return self.vision.run(None, {"pixel_values": pixel_values.astype(np.float32),
                                      "pixel_attention_mask": mask.astype(np.int64),
                                      "spatial_shapes": spatial.astype(np.int64)})[0]

    def greedy(self, ids, images, max_new_tokens, eos_id):
        """ids: prompt ids (list); images: list of (pixel_values, mask, spatial) per image,
        one vision call each. Returns (new_ids, first_step_logits)."""
        ids = np.asarray([ids], np.int64)
        emb = self.embed.run(None, {"input_ids": ids})[0]
        if images:
            feats = np.concatenate([self.image_features(*im) for im in images], axis=0)
            sel = ids[0] == self.image_token_id
            assert sel.sum() == feats.shape[0], (sel.sum(), feats.shape)
            emb[0, sel] = feats
        cache, past_len = self._empty_cache(), 0
        new, first = [], None
        x = emb
        for _ in range(max_new_tokens):
            feeds = {"inputs_embeds": x, "attention_mask": np.ones((1, past_len + x.shape[1]), np.int64),
                     **cache}
            outs = self.dec.run(None, feeds)
            past_len += x.shape[1]
            cache = {n.replace("present_conv.", "past_conv.").replace("present.", "past_key_values."): v
                     for n, v in zip(self.out_names[1:], outs[1:])}
            last = outs[0][0, -1]
            if first is None:
                first = last.copy()
            nxt = int(np.argmax(last))
            if nxt == eos_id:
                break
            new.append(nxt)
            x = self.embed.run(None, {"input_ids": np.array([[nxt]], np.int64)})[0]
        return new, first


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def round_sig(v: float, digits: int = 6) -> float:
    return float(f"{float(v):.{digits}g}")


def run_length(tokens: list[str]) -> list[list]:
    out: list[list] = []
    for t in tokens:
        if out and out[-1][0] == t:
            out[-1][1] += 1
        else:
            out.append([t, 1])
    return out


def write_json(path: str, obj, indent=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent, sort_keys=False)
        f.write("\n")
