"""A separate process computing key statistics on the tiny llama of conftest (for the lock and kill tests).

python tests/stats_worker.py '{"tokenizer": DIR, "corpus": ..., "out": ..., "layers": [1, 3], "sample": [...]}' with
LMEDIT_CACHE set. Optional:
"block_forward": n with "ready" (a file touched at the n-th forward of the pass) and "go" (waited for there;
never created: wait until killed); "block_replace": a layer whose cache file, fully written under its temporary
name, is never renamed into place ("ready" touched, then wait until killed); "waiting": a file touched when the
process announces that it waits for another one's lock. Batches of 20 tokens, a checkpoint after each.
"""

import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

from conftest import tiny_config

torch.set_num_threads(1)


def wait_for(path: str | None) -> None:
    while path is None or not Path(path).exists():
        time.sleep(0.02)


def main(args: dict) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lmedit.stats.moments as moments
    from lmedit.models.arch import mlp_out_module
    from lmedit.stats.sampling import Sample

    tok = AutoTokenizer.from_pretrained(args["tokenizer"], local_files_only=True)
    torch.manual_seed(0)  # as conftest's tiny_model("llama"): the same weights, the same fingerprint
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok))).to(torch.float32).eval()
    moments.compute_second_moments = functools.partial(moments.compute_second_moments, batch_tokens=20,
                                                       checkpoint_every=1)
    forwards = {"n": 0}

    def hook(module, inputs):
        forwards["n"] += 1
        if forwards["n"] == args.get("block_forward"):
            Path(args["ready"]).touch()
            wait_for(args.get("go"))

    mlp_out_module(model, 0).register_forward_pre_hook(hook)
    if "block_replace" in args:
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst).name.startswith(f"layer{args['block_replace']}_"):
                Path(args["ready"]).touch()
                wait_for(None)
            return real_replace(src, dst)

        os.replace = replace

    def announce(message: str) -> None:
        print(message, flush=True)
        if message.startswith("waiting") and args.get("waiting"):
            Path(args["waiting"]).touch()

    got = moments.load_or_compute(model, tok, args["layers"], args["corpus"], Sample(*args["sample"]),
                                  progress=False, announce=announce)
    save_file({f"C{l}": got[l] for l in args["layers"]}, args["out"])


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
