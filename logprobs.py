"""Token log-probs that never build the (tokens x V) logits, with gradient: the engineering under scope.py's scoring
(sequence_logprobs: one forward pass over prompt + response; shared_prompt_logprobs: one prompt pass per group).

A reader of the method needs only what these compute: log pi(y_t | x, y_<t) for the sampled tokens, at a temperature.
At the paper's shapes (V = 151,936, 8 x 12,288 tokens a group) the logits tensor alone would be ~30 GB in bf16, so
`token_logprobs` works in row chunks with a custom backward, and `LogprobHead` puts it in place of a causal LM's
output layer for one forward pass (under FSDP2 the output layer's weight exists only inside forward).
"""

import torch


class _FusedLogprobs(torch.autograd.Function):
    """log softmax(h W^T / T)[token] for N rows, `chunk` rows at a time: the (N, V) logits never exist.

    Forward keeps only the (N,) log-sum-exp. Backward recomputes each chunk's logits (one extra matmul, the price
    of never holding N x V) and uses d logp / d logits = (onehot(token) - softmax) / T, so that
    d h = d logits @ W and d W = d logits^T @ h. Matmuls run in the hidden states' dtype (bf16 on GPUs), the
    softmax in fp32; d W accumulates in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, chunk):
        w, acc = weight.to(hidden.dtype), torch.promote_types(hidden.dtype, torch.float32)  # (V, H), fp32 or fp64
        logp = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)  # (N,)
        lse = torch.empty_like(logp)                               # (N,)
        for i in range(0, hidden.shape[0], chunk):
            x = (hidden[i:i + chunk] / temperature @ w.T).to(acc)  # (c, V): the one block alive, reused in place
            target = x.gather(-1, tokens[i:i + chunk, None]).squeeze(-1)  # (c,)
            top = x.amax(-1, keepdim=True)                         # (c, 1)
            lse[i:i + chunk] = x.sub_(top).exp_().sum(-1).log_() + top.squeeze(-1)
            logp[i:i + chunk] = target - lse[i:i + chunk]
        ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, tokens, lse = ctx.saved_tensors
        w, t, acc = weight.to(hidden.dtype), ctx.temperature, lse.dtype
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        for i in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[i:i + ctx.chunk], grad_logp[i:i + ctx.chunk, None].to(acc) / t   # (c, H), (c, 1)
            d = (h / t @ w.T).to(acc).sub_(lse[i:i + ctx.chunk, None]).exp_().mul_(-g)    # (c, V) -softmax * g
            d.scatter_add_(-1, tokens[i:i + ctx.chunk, None], g)                               # + onehot(token) * g
            if grad_h is not None:
                grad_h[i:i + ctx.chunk] = d.to(w.dtype) @ w                                    # (c, H)
            if grad_w is not None:
                grad_w.addmm_(d.T, h.to(acc))                                                  # (V, H)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def token_logprobs(hidden, weight, tokens, temperature=1.0, chunk=None):
    """log p(token) = log softmax(hidden @ weight.T / temperature)[token], never materialising (tokens x V) logits.
    hidden (B, L, H) last hidden states, weight (V, H) the output layer (or tied embedding), tokens (B, L) -> (B, L)
    fp32 (fp64 for fp64 inputs). Default chunk: rows of 2^25 logits in all (128 MiB of fp32 per block)."""
    if hidden.dim() != 3 or tokens.shape != hidden.shape[:2] or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"hidden (B, L, H), weight (V, H) and tokens (B, L) disagree: {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(tokens.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, l, h = hidden.shape
    chunk = chunk or max(1, 2**25 // weight.shape[0])
    out = _FusedLogprobs.apply(hidden.reshape(b * l, h), weight, tokens.reshape(b * l), float(temperature), int(chunk))
    return out.view(b, l)                                          # (B, L)


class LogprobHead(torch.nn.Module):
    """Stands in for a causal LM's output layer during one forward pass, so the model returns log p(target) per
    position (token_logprobs: no (B, L, V) logits) where it would return logits. Going through the model's own
    forward matters under FSDP2, which gathers the output layer's weight only inside forward.
    rows: which hidden row serves each target row (one prompt row for all of its rollouts)."""

    def __init__(self, lm_head, targets, temperature, rows=None):
        super().__init__()
        if getattr(lm_head, "bias", None) is not None:
            raise ValueError("an output layer with a bias is not supported")
        self.lm_head, self.targets, self.temperature, self.rows = lm_head, targets, temperature, rows

    def forward(self, hidden):                                                    # (B', L', H)
        hidden = hidden if self.rows is None else hidden[self.rows]               # (B, L', H)
        return token_logprobs(hidden[:, :self.targets.shape[1]], self.lm_head.weight, self.targets, self.temperature)


def model_logprobs(model, targets, temperature=1.0, rows=None, **inputs):
    """model(**inputs) with LogprobHead as its output layer: the output's .logits are (B, T) log-probs of targets.
    A wrapper with .module (DDP) is called as it is, so that its gradient hooks run; its module gets the head."""
    inner = getattr(model, "module", model)
    lm_head = inner.get_output_embeddings()
    inner.set_output_embeddings(LogprobHead(lm_head, targets, temperature, rows))
    try:
        return model(**inputs)
    finally:
        inner.set_output_embeddings(lm_head)


def sequence_logprobs(model, batch, temperature=1.0):
    """Log-probs of the response tokens from one forward pass over prompt + response -> (B, T) fp32.
    Position ids count only real tokens, so left padding does not shift positions."""
    ids = torch.cat([batch["prompt_ids"], batch["response_ids"]], 1)              # (B, P+T)
    attn = torch.cat([batch["prompt_mask"], batch["response_mask"]], 1)           # (B, P+T)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    t = batch["response_ids"].shape[1]
    return model_logprobs(model, batch["response_ids"], temperature, input_ids=ids,
                          attention_mask=attn, position_ids=pos, logits_to_keep=t + 1).logits


def shared_prompt_logprobs(model, batch, groups, temperature=1.0):
    """sequence_logprobs for rows where adjacent rows of one group share a prompt (a prompt's
    rollouts, or some of them): each prompt runs once and its KV cache serves its rows (with grad,
    the gradient flows back through the repeated cache into the one prompt pass). -> (B, T) fp32."""
    new = torch.ones_like(groups, dtype=torch.bool)
    new[1:] = groups[1:] != groups[:-1]
    first, prompt_of = new.nonzero().squeeze(1), new.long().cumsum(0) - 1   # (G,), (B,): its prompt
    p_ids, p_mask = batch["prompt_ids"][first], batch["prompt_mask"][first]
    resp = batch["response_ids"]
    out = model_logprobs(model, resp[:, :1], temperature, prompt_of, input_ids=p_ids,
                         attention_mask=p_mask, position_ids=(p_mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values   # transformers 5.21+ / 5.x
    cache.batch_select_indices(prompt_of)                                  # (B) rows of prompt KV
    attn = torch.cat([batch["prompt_mask"], batch["response_mask"]], 1)    # (B, P+T)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)[:, p_ids.shape[1]:]           # (B, T)
    kw = {"cache" if hasattr(out, "cache") else "past_key_values": cache}
    rest = model_logprobs(model, resp[:, 1:], temperature, input_ids=resp, attention_mask=attn,
                          position_ids=pos, **kw)
    return torch.cat([out.logits, rest.logits], 1)                         # (B, T): token 0, 1..T-1
