"""CLIP text transformer with Hugging Face parameter names.

One class for every flavour: SD1 (OpenAI CLIP ViT-L/14, quick_gelu, 12 layers), SD2 (OpenCLIP ViT-H/14
text tower converted to HF names, exact gelu, the first 23 of 24 layers: SD2 conditions on the
penultimate layer's output passed through the final layer norm) and SDXL's two (CLIP ViT-L/14 and
OpenCLIP ViT-bigG/14, all layers kept, both conditioning on the penultimate layer's output WITHOUT the
final layer norm, `layer="penultimate"`; bigG also gives the pooled output, `projection_dim`).

Clip skip (`CLIPTextModel.set_clip_skip`) counts as A1111's "CLIP stop at last layers" and kohya's
`clip_skip`: 1 = the layer the model conditions on, N = the output of the N-th layer from there down,
read as that layer is (through the final layer norm for `layer="last"`, without it for "penultimate").
diffusers' `clip_skip` is this minus one. For SD2 the count starts at the 23rd OpenCLIP layer, the one
SD2 conditions on (as diffusers' 23-layer SD2 text encoders do); for SDXL at the penultimate layer (as
diffusers' SDXL pipelines do). The pooled output always comes from all layers.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common.initializer import initializer, Normal

from ldm.errors import ModelConfigError, UserInputError
from ldm.modules.layers import Linear, LayerNorm, attention, gelu, merge_heads, quick_gelu, split_heads

EOS_TOKEN_ID = 49407   # <|endoftext|>, the same id in OpenAI's and OpenCLIP's vocabulary
LAYERS = ("last", "penultimate")


class Embedding(nn.Cell):
    """A lookup table with a torch-style `weight` `[num, dim]`."""

    def __init__(self, num, dim, std=0.02):
        super().__init__()
        self.weight = Parameter(initializer(Normal(std), (num, dim), ms.float32), name="weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class CLIPTextEmbeddings(nn.Cell):
    def __init__(self, vocab_size, context_length, width):
        super().__init__()
        self.vocab_size = vocab_size
        self.token_embedding = Embedding(vocab_size, width)
        self.position_embedding = Embedding(context_length, width, std=0.01)

    def construct(self, input_ids, extra_embeddings=None):
        if extra_embeddings is None:
            tokens = self.token_embedding(input_ids)
        else:
            # Placeholder ids (>= vocab_size) read row id - vocab_size of extra_embeddings. Both tables are
            # gathered with in-range ids and the result selected per position, so the frozen table is
            # never written and only the selected extra rows receive gradient.
            is_extra = input_ids >= self.vocab_size
            table_ids = ops.where(is_extra, ops.zeros_like(input_ids), input_ids)
            extra_ids = ops.clamp(input_ids - self.vocab_size, 0, ops.shape(extra_embeddings)[0] - 1)
            tokens = ops.where(ops.expand_dims(is_extra, 2),
                               ops.gather(ops.cast(extra_embeddings, ms.float32), extra_ids, 0),
                               self.token_embedding(table_ids))
        length = ops.shape(input_ids)[1]
        return tokens + ops.expand_dims(self.position_embedding.weight[:length], 0)


class CLIPAttention(nn.Cell):
    def __init__(self, width, heads, dtype=ms.float32):
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.q_proj = Linear(width, width, dtype=dtype)
        self.k_proj = Linear(width, width, dtype=dtype)
        self.v_proj = Linear(width, width, dtype=dtype)
        self.out_proj = Linear(width, width, dtype=dtype)

    def construct(self, x, mask):
        q = split_heads(self.q_proj(x), self.heads)
        k = split_heads(self.k_proj(x), self.heads)
        v = split_heads(self.v_proj(x), self.heads)
        return self.out_proj(merge_heads(attention(q, k, v, self.scale, mask), self.heads))


class CLIPMLP(nn.Cell):
    def __init__(self, width, intermediate_size, use_quick_gelu, dtype=ms.float32):
        super().__init__()
        self.fc1 = Linear(width, intermediate_size, dtype=dtype)
        self.fc2 = Linear(intermediate_size, width, dtype=dtype)
        self.act = quick_gelu if use_quick_gelu else gelu

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    def __init__(self, width, heads, intermediate_size, use_quick_gelu, epsilon, dtype=ms.float32):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads, dtype=dtype)
        self.layer_norm1 = LayerNorm(width, eps=epsilon)
        self.mlp = CLIPMLP(width, intermediate_size, use_quick_gelu, dtype=dtype)
        self.layer_norm2 = LayerNorm(width, eps=epsilon)

    def construct(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Cell):
    """The layers, under HF's `encoder.layers` names; CLIPTextTransformer runs them."""

    def __init__(self, layers, width, heads, intermediate_size, use_quick_gelu, epsilon, dtype=ms.float32):
        super().__init__()
        self.layers = nn.CellList([
            CLIPEncoderLayer(width, heads, intermediate_size, use_quick_gelu, epsilon, dtype=dtype)
            for _ in range(layers)])


def first_eos(x, input_ids):
    """`[B, L, D]` -> `[B, D]` float32: each row's hidden state at its first `<|endoftext|>`. Not by argmax
    over the ids (OpenCLIP, HF): a placeholder id above 49407 would win."""
    is_eos = ops.cast(input_ids == EOS_TOKEN_ID, ms.float32)
    first = is_eos * ops.cast(ops.cumsum(is_eos, 1) == 1, ms.float32)
    return ops.sum(ops.expand_dims(first, 2) * ops.cast(x, ms.float32), 1)


class CLIPTextTransformer(nn.Cell):
    def __init__(self, vocab_size, context_length, width, layers, heads, intermediate_size, use_quick_gelu,
                 epsilon, layer="last", pooled=False, dtype=ms.float32):
        super().__init__()
        self.dtype = dtype
        self.embeddings = CLIPTextEmbeddings(vocab_size, context_length, width)
        self.encoder = CLIPEncoder(layers, width, heads, intermediate_size, use_quick_gelu, epsilon, dtype=dtype)
        self.final_layer_norm = LayerNorm(width, eps=epsilon)
        # causal mask added to float32 scores: a large finite negative keeps softmax gradients finite
        self.causal_mask = Tensor(np.triu(np.full((context_length, context_length), -1e9, np.float32), k=1))
        # how many layers run before the context is read (clip skip lowers it); graph mode compiles it in
        self.context_layers = layers - LAYERS.index(layer)
        self.normed_context = layer == "last"
        self.pooled = pooled

    def construct(self, input_ids, extra_embeddings=None):
        """The context `[B, L, D]`, and with `pooled` also `final_layer_norm(all layers)` at each row's
        first `<|endoftext|>` `[B, D]` (HF's pooler_output), float32."""
        length = ops.shape(input_ids)[1]
        mask = self.causal_mask[:length, :length]
        x = ops.cast(self.embeddings(input_ids, extra_embeddings), self.dtype)
        # indexed, not sliced: a slice of a CellList is a new CellList that renames the layers' parameters
        for i in range(self.context_layers):
            x = self.encoder.layers[i](x, mask)
        context = ops.cast(self.final_layer_norm(x) if self.normed_context else x, ms.float32)
        if not self.pooled:
            return context
        for i in range(self.context_layers, len(self.encoder.layers)):
            x = self.encoder.layers[i](x, mask)
        return context, self.final_layer_norm(first_eos(x, input_ids))


class CLIPTextModel(nn.Cell):
    """`construct(input_ids [B, L] int, extra_embeddings [N, D] or None)` -> the context `[B, L, D]`, or with
    `projection_dim` > 0 the tuple `(context, pooled [B, projection_dim])` (float32).

    layer: "last" = the context is the last layer's output through the final layer norm (SD 1.x/2.x);
    "penultimate" = the penultimate layer's output without it (SDXL, diffusers' `hidden_states[-2]`).
    projection_dim > 0: also the pooled output through `text_projection` (HF CLIPTextModelWithProjection).
    """

    def __init__(self, vocab_size=49408, context_length=77, width=768, layers=12, heads=12,
                 intermediate_size=3072, use_quick_gelu=True, epsilon=1e-5, layer="last", projection_dim=0,
                 dtype=ms.float32):
        super().__init__()
        if layer not in LAYERS:
            raise ModelConfigError(f"CLIPTextModel: layer {layer!r} must be one of {', '.join(LAYERS)}")
        self.vocab_size = vocab_size
        self.width = width
        self.text_model = CLIPTextTransformer(vocab_size, context_length, width, layers, heads, intermediate_size,
                                              use_quick_gelu, epsilon, layer, projection_dim > 0, dtype=dtype)
        self.text_projection = Linear(width, projection_dim, bias=False, dtype=dtype) if projection_dim else None
        self.conditioning_layer = self.text_model.context_layers
        self.clip_skip = 1

    def set_clip_skip(self, clip_skip):
        """Read the context from the `clip_skip`-th layer counted down from the one the model conditions on
        (1 = that layer). Call it before the first call: a compiled graph keeps the layer count it was
        compiled with."""
        top, layers = self.conditioning_layer, len(self.text_model.encoder.layers)
        if not 1 <= clip_skip <= top:
            counted = (f"has {layers} layers; use --clip_skip 1 (the last layer, no skip)" if top == layers else
                       f"conditions on layer {top} of its {layers}; use --clip_skip 1 (layer {top}, no skip)")
            raise UserInputError(f"clip_skip {clip_skip}: this text encoder {counted} to {top}")
        self.clip_skip = clip_skip
        self.text_model.context_layers = top - (clip_skip - 1)

    def construct(self, input_ids, extra_embeddings=None):
        if self.text_projection is None:
            return self.text_model(input_ids, extra_embeddings)
        context, pooled = self.text_model(input_ids, extra_embeddings)
        return context, ops.cast(self.text_projection(pooled), ms.float32)
