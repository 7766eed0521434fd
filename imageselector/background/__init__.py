"""Background removal stage (rembg): `cli.main` is `scripts/bg_remover.py`.

Modules: `providers` (which onnxruntime providers), `session` (the one rembg session, the batched
u2net path), `imaging` (decode, composite, marker), `stage` (the worker), `standin` (a tiny u2net
lookalike for tests and the offline demo).
"""
