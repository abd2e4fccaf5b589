"""Does multi-layer MEMIT put as much into the residual stream as a one-layer edit aiming at the same z*?

Issue 16's measurement: three facts, C = I, λ = 0.01; the hidden state after block 6 at the last subject
token of the bare prompt moves ‖h_6(edited) − h_6(unedited)‖ under a 5-layer edit (layers 2–6) and under a
1-layer edit (layer 6). Both aim at the same z*, so the ratio must be about 1 (it was 2.3 when z was read at
W_6's output). Prints one line per fact and writes benchmarks/results/spread-check.json.

    .venv/bin/python benchmarks/spread_check.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmedit.editors import get_editor, make_config
from lmedit.locate.keys import read_at_subject
from lmedit.models import load_model
from lmedit.requests import EditRequest

FACTS = [EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
         EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French"),
         EditRequest("Toyota was founded in the country of", "Toyota", "Germany", "Japan")]


def hidden_after(model, tok, layer):
    _, outs = read_at_subject(model, tok, FACTS, ["{}"], [], {"h": (layer, "residual")})
    return outs["h"]


def main() -> None:
    lm = load_model("smollm2-135m")
    model, tok = lm.model, lm.tokenizer
    h0 = hidden_after(model, tok, 6)
    moved, reached = {}, {}
    for name, layers in (("1 layer", "6"), ("5 layers", "2,3,4,5,6")):
        config = make_config("memit", "smollm2-135m", model,
                             {"layers": layers, "mom2_weight": "0.01", "identity_cov": "true"})
        patch = get_editor("memit").fn(model, tok, FACTS, config, progress=False)
        with patch.apply(model):
            moved[name] = (hidden_after(model, tok, 6) - h0).norm(dim=1)
        reached[name] = patch.meta["v_star"]["z_reached"]
    ratio = (moved["5 layers"] / moved["1 layer"]).tolist()
    for fact, r, a, b in zip(FACTS, ratio, reached["1 layer"], reached["5 layers"]):
        print(f"{fact.subject:20s} ‖Δh_6‖ 5 layers / 1 layer = {r:.3f}   z* reached: 1 layer {a:.3f}, 5 layers {b:.3f}")
    out = Path(__file__).parent / "results" / "spread-check.json"
    out.write_text(json.dumps({"ratio_5_over_1": ratio, "z_reached": reached,
                               "moved": {k: v.tolist() for k, v in moved.items()}}, indent=1))


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
