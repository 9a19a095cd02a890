"""Speed measurements behind `medmoe bench` (docs/speed.md has the numbers and the commands).

- `moe_layer`: one Med-MoE FFN layer at Phi-2 size: our grouped path, the official GShard einsum
  dispatch, the plain loop, a fused-meta variant, and two dense FFNs as the floor.
- `decode`: batch-1 and batch-8 tokens/s of a Phi-2-size Med-MoE (random weights) with an image
  prompt, beside the memory floor.
- `train`: phase-3 training tokens/s and MFU at Phi-2 size, gradient checkpointing on.
- `cpu`: latency of one short answer from the nano model on a few CPU cores.
- `serve`: concurrent streaming OpenAI clients against `medmoe serve` on loopback (serve_load.py,
  servers.py): aggregate tokens/s, time to first token, inter-token latency, errors.
- `soak`: many clients for a fixed time, some leaving mid-stream or sending bad inputs, with the
  server's memory sampled (soak.py).
"""
