"""The UNet's attention as ONNX Runtime's ``com.microsoft::MultiHeadAttention`` in the export.

The TorchScript exporter writes ``F.scaled_dot_product_attention`` as MatMul-Softmax-MatMul,
which holds the N x N scores of every head in memory. ONNX Runtime's contrib op
``MultiHeadAttention`` (query, key, value as ``(B, N, C)``, attribute ``num_heads``) has a
flash-style CPU kernel: 28.7 ms instead of 39.1 ms on one 2632-token, 3x32-channel call of the
compact model (2 threads), and memory linear in N, which whole images need (a 1280x720 image
peaked at 11 GB with MatMul-Softmax-MatMul, 1.7 GB with ``MultiHeadAttention``).

:func:`multi_head_attention` gives the diffusers ``Attention`` modules that use
``AttnProcessor2_0`` a processor that traces as that op, for the time of an export only. Only the
plain case is rewritten (3-D hidden states, no mask, no group/spatial/cross/q/k norms); any other
call goes to the original processor, so an unusual model still exports, with the ops it had.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

DOMAIN = "com.microsoft"
OP = f"{DOMAIN}::MultiHeadAttention"


class _MultiHeadAttention(torch.autograd.Function):
    """``softmax(q k^T / sqrt(d)) v`` over ``heads`` heads of ``(B, N, C)`` tensors, with SDPA's
    default scale (``MultiHeadAttention``'s default too); exported as the contrib op."""

    @staticmethod
    def forward(ctx, query, key, value, heads: int):
        batch, _, channels = query.shape
        q, k, v = (t.view(batch, -1, heads, channels // heads).transpose(1, 2)
                   for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch, -1, channels)

    @staticmethod
    def symbolic(g, query, key, value, heads: int):
        out = g.op(OP, query, key, value, num_heads_i=heads)
        out.setType(query.type())  # (B, N, C) as the query: the exporter cannot infer it
        return out


class _ExportProcessor:
    """diffusers' ``AttnProcessor2_0`` with the attention step as :class:`_MultiHeadAttention`;
    calls it cannot rewrite go to ``original``."""

    def __init__(self, original) -> None:
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        plain = (not args and not kwargs and attention_mask is None and hidden_states.ndim == 3
                 and attn.spatial_norm is None and attn.group_norm is None
                 and attn.norm_q is None and attn.norm_k is None
                 and (encoder_hidden_states is None or not attn.norm_cross))
        if not plain:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, *args, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.to_q(hidden_states)
        if attn.scale != (query.shape[-1] // attn.heads) ** -0.5:  # scale_qk=False: not SDPA's
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        out = _MultiHeadAttention.apply(query, attn.to_k(context), attn.to_v(context),
                                        int(attn.heads))
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextmanager
def multi_head_attention(model: torch.nn.Module):
    """Within the ``with`` block, the ``AttnProcessor2_0`` attention of ``model`` exports as
    ``MultiHeadAttention`` (export with ``custom_opsets={DOMAIN: 1}``); the original
    processors are back afterwards, also after an error. Yields the number of modules changed."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    changed = [(m, m.processor) for m in model.modules()
               if isinstance(m, Attention) and type(m.processor) is AttnProcessor2_0]
    try:
        for module, original in changed:
            module.set_processor(_ExportProcessor(original))
        yield len(changed)
    finally:
        for module, original in changed:
            module.set_processor(original)
