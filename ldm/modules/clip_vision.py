"""CLIP vision transformer (ViT) with Hugging Face parameter names, for scoring samples.

`CLIPVisionModelWithProjection` holds `vision_model.*` and `visual_projection.weight`; with
`ldm.modules.clip_text.CLIPTextModel(..., projection_dim=P)` (`text_model.*`, `text_projection.weight`) the
two cells together carry every parameter of a transformers `CLIPModel` file. The encoder layers are the
text tower's (`CLIPEncoder`), run without a mask: every patch attends to every other.
"""
import mindspore as ms
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import initializer, Normal

from ldm.modules.clip_text import CLIPEncoder, Embedding
from ldm.modules.layers import Conv2d, LayerNorm, Linear


class CLIPVisionEmbeddings(nn.Cell):
    """Pixels `[B, C, S, S]` -> tokens `[B, 1 + (S/p)^2, D]`: the class token, then the patches in row order,
    plus the learned positions. The position table fixes the image size (no interpolation)."""

    def __init__(self, width, image_size, patch_size, num_channels=3, dtype=ms.float32):
        super().__init__()
        self.class_embedding = Parameter(initializer(Normal(width ** -0.5), (width,), ms.float32),
                                         name="class_embedding")
        self.patch_embedding = Conv2d(num_channels, width, patch_size, stride=patch_size, bias=False, dtype=dtype)
        self.position_embedding = Embedding((image_size // patch_size) ** 2 + 1, width)

    def construct(self, pixel_values):
        patches = ops.cast(self.patch_embedding(pixel_values), ms.float32)
        b, d, _, _ = ops.shape(patches)
        patches = ops.transpose(ops.reshape(patches, (b, d, -1)), (0, 2, 1))
        cls = ops.broadcast_to(ops.reshape(self.class_embedding, (1, 1, d)), (b, 1, d))
        return ops.concat((cls, patches), 1) + ops.expand_dims(self.position_embedding.weight, 0)


class CLIPVisionTransformer(nn.Cell):
    def __init__(self, image_size, patch_size, width, layers, heads, intermediate_size, use_quick_gelu, epsilon,
                 num_channels=3, dtype=ms.float32):
        super().__init__()
        self.dtype = dtype
        self.embeddings = CLIPVisionEmbeddings(width, image_size, patch_size, num_channels, dtype=dtype)
        self.pre_layrnorm = LayerNorm(width, eps=epsilon)  # sic: the name in OpenAI's and HF's weights
        self.encoder = CLIPEncoder(layers, width, heads, intermediate_size, use_quick_gelu, epsilon, dtype=dtype)
        self.post_layernorm = LayerNorm(width, eps=epsilon)

    def construct(self, pixel_values):
        """HF's pooler_output `[B, D]` float32: the class token of the last layer through `post_layernorm`."""
        x = ops.cast(self.pre_layrnorm(self.embeddings(pixel_values)), self.dtype)
        for i in range(len(self.encoder.layers)):
            x = self.encoder.layers[i](x, None)
        return self.post_layernorm(ops.cast(x[:, 0], ms.float32))


class CLIPVisionModelWithProjection(nn.Cell):
    """`construct(pixel_values [B, C, S, S])` -> the image embedding `[B, projection_dim]` float32 (not normalised),
    HF's `CLIPModel.get_image_features`."""

    def __init__(self, image_size=224, patch_size=14, width=1024, layers=24, heads=16, intermediate_size=4096,
                 use_quick_gelu=True, epsilon=1e-5, num_channels=3, projection_dim=768, dtype=ms.float32):
        super().__init__()
        self.image_size = image_size
        self.vision_model = CLIPVisionTransformer(image_size, patch_size, width, layers, heads, intermediate_size,
                                                  use_quick_gelu, epsilon, num_channels, dtype=dtype)
        self.visual_projection = Linear(width, projection_dim, bias=False, dtype=dtype)

    def construct(self, pixel_values):
        return ops.cast(self.visual_projection(self.vision_model(pixel_values)), ms.float32)
