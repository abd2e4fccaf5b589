"""A deliberately plain ROME / MEMIT / EMMET, written from the papers' equations, to check lmedit's fast path.

Nothing here is shared with `lmedit.locate` except the data formatting of a target after its prompt: one
request at a time, every prompt run whole through every layer at every step (no KV cache, no prefix replay,
no batching, no value store, no chunking), keys re-read layer by layer, z read from the model's own
`output_hidden_states` (the residual stream), the solvers written as the papers write them. Slow and
obvious on purpose.

Notation: W_l the MLP output projection at layer l (v = W k), L the last edit layer, C the key second
moment (here the identity), k* the key at the last subject token averaged over the context templates,
v* = v0 + δ with δ optimised (ROME eq. 4 / MEMIT eq. 16), and for each layer l in order (MEMIT Alg. 1):
    R_l = (z* − h_L(current model)) / (layers left)
    least squares (MEMIT eq. 14):   ΔW_l = R_l Kᵀ (λ C + K Kᵀ)⁻¹
    equality (ROME eq. 2, EMMET):   ΔW_l = R_l (Kᵀ C⁻¹ K + μ I)⁻¹ Kᵀ C⁻¹
Through Gemma's post-MLP norm N(x) = (1 + w) ⊙ x / √(mean x² + ε) the share is mapped to the W output of the
same length whose normed output points at N(m) + R (DESIGN §3).
"""

from __future__ import annotations

import torch

from lmedit.models.arch import arch_for, get_module
from lmedit.requests import join_prompt_target


def blocks(model):
    return get_module(model, arch_for(model).layers)


def W_module(model, l):
    return getattr_path(blocks(model)[l], arch_for(model).mlp_out)


def getattr_path(module, path):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def W_matrix(model, l):
    """W_l as (out, in)."""
    w = W_module(model, l).weight
    return w.T if arch_for(model).transposed else w


def add_to_W(model, l, dW):
    w = W_module(model, l).weight
    with torch.no_grad():
        w += dW.T.to(w.dtype) if arch_for(model).transposed else dW.to(w.dtype)


def last_subject_token(tok, text, subject):
    """Token ids of `text` (with the tokenizer's special tokens) and the index of the subject's last token."""
    start = text.rfind(subject)
    end = start + len(subject)
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start]
    return list(enc["input_ids"]), inside[-1]


def run(model, ids, hook_module=None, hook=None, capture_input_of=None, logits_to_keep=0):
    """One whole forward of one sequence; optional output hook; optional capture of a module's input.
    `logits_to_keep` = N unembeds only the last N positions (0: all): the oracle's one economy."""
    seen = {}
    handles = []
    if hook_module is not None:
        handles.append(hook_module.register_forward_hook(hook))
    if capture_input_of is not None:
        handles.append(capture_input_of.register_forward_hook(lambda m, a, o: seen.__setitem__("in", a[0])))
    try:
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, logits_to_keep=logits_to_keep)
    finally:
        for h in handles:
            h.remove()
    return out, seen.get("in")


def key(model, tok, text, subject, l):
    """The input of W_l at the last subject token."""
    ids, i = last_subject_token(tok, text, subject)
    with torch.no_grad():
        _, k = run(model, ids, capture_input_of=W_module(model, l), logits_to_keep=1)
    return k[0, i].double()


def k_star(model, tok, request, templates, l, average="by_kind"):
    """MEMIT's compute_ks: the mean over each kind of context (bare; prefixed), then the mean of the kinds.
    ROME's compute_u ("uniform"): the mean over all templates."""
    ks = [key(model, tok, t.replace("{}", request.prompt), request.subject, l) for t in templates]
    if average == "uniform" or len(ks) == 1:
        return torch.stack(ks).mean(0)
    return (ks[0] + torch.stack(ks[1:]).mean(0)) / 2


def site_value(model, tok, request, L, site):
    """On the bare prompt at the last subject token: h_L (residual stream) or W_L's output (mlp_out)."""
    ids, i = last_subject_token(tok, request.prompt, request.subject)
    seen = {}
    with torch.no_grad():
        out, _ = run(model, ids, W_module(model, L), lambda m, a, o: seen.__setitem__("out", o), logits_to_keep=1)
    if site == "residual":
        return out.hidden_states[L + 1][0, i].double()  # hidden_states[0] is the embedding output
    return seen["out"][0, i].double()


def _add_at(position, delta):
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[0, position] = hidden[0, position] + delta.to(hidden.dtype)
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
    return hook


_FOUND: dict = {}


def _state(model) -> bytes:
    """The model's weights, as bytes to key the memo of v* (tests share the first batch's v*)."""
    import hashlib

    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.digest()


def v_star(model, tok, request, templates, L, cfg):
    """(v0, δ) for one request, memoised on everything it depends on (a pure function: no shortcut)."""
    key = (_state(model), request, tuple(templates), L, cfg)
    if key not in _FOUND:
        _FOUND[key] = _v_star(model, tok, request, templates, L, cfg)
    return _FOUND[key]


def _v_star(model, tok, request, templates, L, cfg):
    """(v0, δ) for one request: Adam on δ, loss = mean_prompts NLL/|target| + kl_factor·KL + wd·‖δ‖²/‖v0‖²."""
    site_mod = blocks(model)[L] if cfg.site == "residual" else W_module(model, L)
    prompts = []
    for t in templates:
        text = t.replace("{}", request.prompt)
        ids, i = last_subject_token(tok, text, request.subject)
        _, cont = join_prompt_target(text, request.target_new)
        target = tok(cont, add_special_tokens=False)["input_ids"]
        prompts.append((ids + target[:-1], i, len(ids) - 1, target))
    kl_ids, kl_i = last_subject_token(tok, f"{request.subject} is a", request.subject)
    with torch.no_grad():
        p_init = run(model, kl_ids, logits_to_keep=1)[0].logits[0, -1].double().log_softmax(-1)
    v0 = site_value(model, tok, request, L, cfg.site)
    delta = torch.zeros_like(v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    for step in range(cfg.steps):
        nlls = []
        for ids, i, first, target in prompts:
            # the target tokens are predicted at the last len(target) positions: first .. first + len − 1
            logits = run(model, ids, site_mod, _add_at(i, delta), logits_to_keep=len(target))[0].logits[0]
            assert first == len(ids) - len(target)
            logp = logits.double().log_softmax(-1).gather(1, torch.tensor(target)[:, None])
            nlls.append(-logp.mean())
        p_new = run(model, kl_ids, site_mod, _add_at(kl_i, delta), logits_to_keep=1)[0].logits[0, -1].double().log_softmax(-1)
        kl = (p_init.exp() * (p_init - p_new)).sum()  # KL(original ‖ edited)
        loss = torch.stack(nlls).mean() + cfg.kl_factor * kl + cfg.weight_decay * delta.norm() ** 2 / v0.norm() ** 2
        if loss.item() < cfg.early_stop_loss or step == cfg.steps - 1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            limit = cfg.clamp_norm_factor * v0.norm()
            if delta.norm() > limit:
                delta.mul_(limit / delta.norm())
    return v0, delta.detach()


def through_post_norm(model, l, m, r):
    """The change of W_l's output that moves the residual by r through Gemma's post-MLP norm (if any): W's output
    keeps its length ‖m‖ and turns to the unit direction x whose normed output G ⊙ x is nearest to N(m) + r."""
    name = arch_for(model).mlp_out_norm
    if name is None:
        return r
    norm = getattr_path(blocks(model)[l], name)
    g = 1.0 + norm.weight.detach().double()  # Gemma's RMSNorm: (1 + w) ⊙ x / rms(x)
    rms = torch.sqrt((m ** 2).mean(-1, keepdim=True) + norm.eps)
    t = g * m / rms + r  # where the normed output should go
    G = g * m.norm(dim=-1, keepdim=True) / rms  # N(‖m‖ x) = G ⊙ x for a unit x
    rows = []
    for Gi, ti in zip(G, t):  # min ‖G x − t‖ on the unit sphere: x = G t / (G² + ν), ‖x‖ = 1, ν > −min G²
        lo, hi = -float((Gi ** 2).min()), float((Gi * ti).norm())
        for _ in range(300):
            nu = (lo + hi) / 2
            if float((Gi * ti / (Gi ** 2 + nu)).norm()) > 1:
                lo = nu
            else:
                hi = nu
        rows.append(Gi * ti / (Gi ** 2 + (lo + hi) / 2))
    x = torch.stack(rows)
    return m.norm(dim=-1, keepdim=True) * x / x.norm(dim=-1, keepdim=True) - m


def W_output(model, tok, request, l):
    return site_value(model, tok, request, l, "mlp_out")


def edit_batch(model, tok, requests, templates, layers, solver, lam, mu, value_cfg, average="by_kind"):
    """One locate-then-edit batch (MEMIT Alg. 1), applied to `model` in place. Returns the v* deltas."""
    L = layers[-1]
    found = [v_star(model, tok, r, templates, L, value_cfg) for r in requests]
    z_star = torch.stack([v0 + d for v0, d in found])  # (n, d)
    for i, l in enumerate(layers):
        K = torch.stack([k_star(model, tok, r, templates, l, average) for r in requests]).T  # (d_in, n)
        z = torch.stack([site_value(model, tok, r, L, value_cfg.site) for r in requests])
        r = (z_star - z) / (len(layers) - i)
        if value_cfg.site == "residual":
            m = torch.stack([W_output(model, tok, q, l) for q in requests])
            r = through_post_norm(model, l, m, r)
        R = r.T
        C = torch.eye(K.shape[0], dtype=torch.float64)
        if solver == "least_squares":
            dW = R @ K.T @ torch.linalg.inv(lam * C + K @ K.T)
        else:
            Cinv = torch.linalg.inv(lam * C)
            dW = R @ torch.linalg.inv(K.T @ Cinv @ K + mu * torch.eye(K.shape[1], dtype=torch.float64)) @ K.T @ Cinv
        add_to_W(model, l, dW)
    return [d for _, d in found]


def rome(model, tok, requests, templates, layer, value_cfg):
    """ROME: one request at a time, each a one-layer equality edit on the model edited so far."""
    for r in requests:
        edit_batch(model, tok, [r], templates, [layer], "equality", 1.0, 0.0, value_cfg, average="uniform")


# --- AlphaEdit (Fang et al. 2025) and UltraEdit (Gu et al. 2025), as plainly ---

def null_space_projection(C, threshold):
    """P = U₀U₀ᵀ over the eigenvectors of C with eigenvalue below `threshold` (the reference's S < threshold)."""
    S, U = torch.linalg.eigh(C.double())
    U0 = U[:, S < threshold]
    return U0 @ U0.T


def alphaedit_batch(model, tok, requests, templates, layers, C, threshold, alpha, edited_grams, value_cfg):
    """One AlphaEdit batch in place: MEMIT's loop with ΔW_l = R Kᵀ P ((KKᵀ + K_pK_pᵀ) P + αI)⁻¹, then the batch's
    keys (read on the edited model) are added to `edited_grams` (K_pK_pᵀ per layer), as the reference does."""
    L = layers[-1]
    found = [v_star(model, tok, r, templates, L, value_cfg) for r in requests]
    z_star = torch.stack([v0 + d for v0, d in found])
    for i, l in enumerate(layers):
        K = torch.stack([k_star(model, tok, r, templates, l) for r in requests]).T
        z = torch.stack([site_value(model, tok, r, L, "residual") for r in requests])
        m = torch.stack([W_output(model, tok, q, l) for q in requests])
        R = through_post_norm(model, l, m, (z_star - z) / (len(layers) - i)).T
        P = null_space_projection(C[l], threshold)
        eye = torch.eye(K.shape[0], dtype=torch.float64)
        dW = R @ K.T @ P @ torch.linalg.inv((K @ K.T + edited_grams[l]) @ P + alpha * eye)
        add_to_W(model, l, dW)
    for l in layers:
        K = torch.stack([k_star(model, tok, r, templates, l) for r in requests]).T
        edited_grams[l] = edited_grams[l] + K @ K.T


def ultraedit_batch(model, tok, requests, layers, lr, seen_features):
    """One UltraEdit batch in place. Each request alone, whole: k (W_l's input) and g (the gradient of the batch's
    mean target NLL at W_l's output) at the positions predicting target tokens. Every feature row [k, g] ever seen
    (`seen_features`, per weight shape, this batch's included) gives the mean and the unbiased std directly;
    v = −lr ‖k̂‖² ĝ; ΔW = Vᵀ K (KᵀK + I)⁻¹."""
    eps = float(torch.finfo(torch.float32).eps)
    rows = []
    for r in requests:
        _, cont = join_prompt_target(r.prompt, r.target_new)
        prompt = tok(r.prompt, add_special_tokens=True)["input_ids"]
        target = tok(cont, add_special_tokens=False)["input_ids"]
        rows.append((prompt + target[:-1], len(prompt) - 1, target))
    n_targets = sum(len(t) for _, _, t in rows)
    K = {l: [] for l in layers}
    G = {l: [] for l in layers}
    for ids, first, target in rows:
        positions = list(range(first, first + len(target)))
        seen = {}

        def keep(l):
            def hook(module, args, output):
                output.retain_grad()
                seen[l] = (args[0].detach(), output)
            return hook

        handles = [W_module(model, l).register_forward_hook(keep(l)) for l in layers]
        for l in layers:
            W_module(model, l).weight.requires_grad_(True)
        try:
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            nll = -logits.double().log_softmax(-1)[positions, target].sum() / n_targets
            nll.backward()
        finally:
            for h in handles:
                h.remove()
            for l in layers:
                W_module(model, l).weight.requires_grad_(False)
                W_module(model, l).weight.grad = None
        for l in layers:
            K[l].append(seen[l][0][0, positions].double())
            G[l].append(seen[l][1].grad[0, positions].double())
    K = {l: torch.cat(K[l]) for l in layers}
    G = {l: torch.cat(G[l]) for l in layers}
    shape = {l: tuple(W_matrix(model, l).shape) for l in layers}
    for l in layers:
        seen_features.setdefault(shape[l], []).append(torch.cat([K[l], G[l]], 1))
    for l in layers:
        X = torch.cat(seen_features[shape[l]])
        mean = X.mean(0)
        std = torch.sqrt(((X - mean) ** 2).sum(0) / (X.shape[0] - 1 + eps))
        Z = (torch.cat([K[l], G[l]], 1) - mean) / (std + eps)
        d_in = K[l].shape[1]
        k_hat, g_hat = Z[:, :d_in], Z[:, d_in:]
        V = -lr * (k_hat ** 2).sum(1, keepdim=True) * g_hat
        dW = V.T @ K[l] @ torch.linalg.inv(K[l].T @ K[l] + torch.eye(d_in, dtype=torch.float64))
        add_to_W(model, l, dW)
