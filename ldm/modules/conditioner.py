"""What the UNet is conditioned on, from prompts' token ids and the placeholder vectors.

SD 1.x/2.x: the text encoder's hidden states (`context`), and no vector (`y` is None).
SDXL (sgm's GeneralConditioner): the contexts of CLIP ViT-L and OpenCLIP ViT-bigG side by side
(768 + 1280 = 2048 wide), and the vector `y`: bigG's pooled output followed by the sinusoidal embeddings of
the six size ids (original height and width, crop top and left, target height and width).

Placeholder vectors come as one array `[N, sum of the encoders' widths]`, each encoder reading its own
columns, so the two sets of an SDXL embedding are trained as one parameter (one Adam state, one gradient
norm) and every caller handles SD and SDXL alike.
"""
from mindspore import nn, ops

from ldm.modules.openaimodel import size_embedding


class Conditioner(nn.Cell):
    """`construct(input_ids, vectors=None, size_ids=None) -> (context, y)`.

    input_ids: `[B, L]` (SD) or `[B, 2, L]`, one row per encoder's tokenizer (SDXL: the two pad differently);
    vectors: `[N, sum of widths]` placeholder vectors, or None; size_ids: `[B, 6]` float (SDXL only).
    """

    def __init__(self, text_encoders, size_embedding_dim=256):
        super().__init__()
        self.text_encoders = nn.CellList(text_encoders)
        self.is_xl = len(text_encoders) == 2
        self.width_1 = text_encoders[0].width
        self.size_embedding_dim = size_embedding_dim

    def construct(self, input_ids, vectors=None, size_ids=None):
        if not self.is_xl:
            return self.text_encoders[0](input_ids, vectors), None
        vectors_1 = None if vectors is None else vectors[:, :self.width_1]
        vectors_2 = None if vectors is None else vectors[:, self.width_1:]
        context_1 = self.text_encoders[0](input_ids[:, 0], vectors_1)
        context_2, pooled = self.text_encoders[1](input_ids[:, 1], vectors_2)
        y = ops.cat([pooled, size_embedding(size_ids, self.size_embedding_dim)], axis=-1)
        return ops.cat([context_1, context_2], axis=-1), y
