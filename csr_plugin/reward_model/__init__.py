"""`csr train-rm`: a multimodal reward model, a VLM backbone with a scalar head trained on preference pairs.

model.py (backbone + head, save / load), losses.py (Bradley-Terry), partial.py (PARGS cut pairs),
data.py (held-out split, cut pairs -> batches), train_main.py (one rank), launch.py (torchrun).
See docs/reward-model.md.
"""
