"""Backpack language models (DESIGN §6): the architecture (model), training a small one (train), choosing and
training sense deltas (senses), and steering a large model with a Backpack's edit (ensemble)."""
