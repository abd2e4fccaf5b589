"""Backpack language models (DESIGN §6): training a small one (train), choosing and training sense deltas
(senses), and steering a large model with a Backpack's edit (ensemble). The architecture itself is a model:
lmedit.models.backpack."""
