"""What an honest-but-curious server learns from the wire (threat model and results: docs/privacy.md).

wire.py (recording and parsing the messages), session.py (the victim replays held-out samples), attacks.py (image
inversion, text recovery, label exposure), surrogate.py (the black-box attacker's client), nets.py, probes.py,
metrics.py, images.py (image sets), suite.py (one checkpoint under attack), cli.py (`qtllava attack`).
Kept free of imports here so that the CLI can register `attack` without loading torch.
"""
