"""Egeria's machinery, one trade per module (the policy itself is
:mod:`fxfreeze.runtime.policies.egeria`):

- :mod:`.probe`: the fixed probe batch and the training side's block activations;
- :mod:`.backends`: how a block's snapshot becomes a low-precision copy (int8, bf16, fp32),
  a registry that outside backends join;
- :mod:`.builder`: building a block's reference from a snapshot of its weights;
- :mod:`.references`: per block, its builder and the anchor built last (the worker's jobs);
- :mod:`.regime`: per block, pretrained or from scratch, and the threshold it is held to;
- :mod:`.worker`: the CPU thread that builds and runs references off the training thread;
- :mod:`.plasticity`: the SP loss, the trend statistic and the per-block tracker.

Nothing here is imported by ``import fxfreeze``; ``torch.ao.quantization`` loads only when
an int8 backend runs.
"""

__all__: list[str] = []
