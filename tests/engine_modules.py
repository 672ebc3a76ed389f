"""Small real torch modules shaped like a UNet's cross-attention, for the engine tests."""

import torch


class CrossAttention(torch.nn.Module):
    """Same forward signature as ComfyUI's CrossAttention: (x, context, value, mask, transformer_options)."""

    def __init__(self, dim=8, context_dim=6, heads=2):
        super().__init__()
        self.heads = heads
        self.to_q = torch.nn.Linear(dim, dim, bias=False)
        self.to_k = torch.nn.Linear(context_dim, dim, bias=False)
        self.to_v = torch.nn.Linear(context_dim, dim, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(dim, dim))

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        b, n, d = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context if value is None else value).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.to_out(out)


class Block(torch.nn.Module):
    """A transformer block as in SD UNets: self-attention over the image tokens, then cross-attention."""

    def __init__(self):
        super().__init__()
        self.attn1 = CrossAttention(dim=8, context_dim=8)
        self.attn2 = CrossAttention()

    def forward(self, x, context, transformer_options):
        x = x + self.attn1(x, context=x, transformer_options=transformer_options)
        return x + self.attn2(x, context=context, transformer_options=transformer_options)


class TinyDenoiser(torch.nn.Module):
    """Two blocks with self- and cross-attention, called the way ComfyUI batches conds: chunks along dim 0."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = torch.nn.ModuleList([Block(), Block()])

    def forward(self, x, context, transformer_options):
        for block in self.blocks:
            x = block(x, context, transformer_options)
        return x


class OptionlessBlock(Block):
    """A block that calls its attention without transformer_options, as PixArt's blocks do."""

    def forward(self, x, context, transformer_options):
        x = x + self.attn1(x, context=x)
        return x + self.attn2(x, context=context)


class OptionlessDenoiser(TinyDenoiser):
    def __init__(self, seed=0):
        super().__init__(seed)
        torch.manual_seed(seed)
        self.blocks = torch.nn.ModuleList([OptionlessBlock(), OptionlessBlock()])
