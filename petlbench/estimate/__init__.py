"""The modelled time of a whole sweep (VTAB-1k x one method x one seed) from measured costs.

``petlbench bench --sweep-estimate -m arc`` answers "how long will my sweep take on an H100?"
before anyone rents one, and says how it got there. Three kinds of numbers, kept apart in the
output:

- **counted** (exact, device-independent): aten ops, FLOPs and tensor bytes of one training step
  of the method at its real VTAB batch size and of one evaluation batch, on the ``meta`` device
  (no compute, so ViT-B/16 is counted in seconds on any machine);
- **measured** (on this machine): the train step, an evaluation batch, the fixed costs (building
  and hashing the backbone, paid once per process since the backbone cache; the per-run copy of
  the cached backbone with a new head and the method applied; the deployed-latency timing of
  every record), the host's cost per dispatched op (a structurally identical ViT with tiny
  tensors) and the host cost of a packed step of R such runs relative to one run's;
- **modelled** (per GPU, from vendor data sheets and stated efficiencies): each counted op's
  time on the GPU as a roofline, ``max(FLOPs / (peak x e_mm), bytes / (bandwidth x e_bw))``,
  with a per-kernel floor in eager mode, and the host's dispatch time that eager mode cannot
  hide. "eager" is a step that issues every op from Python (petlbench's default); "compiled" is
  one that issues the step as a whole (torch.compile / CUDA graphs: no host cost per op and no
  launch floor except for matmul-class kernels; elementwise ops fused away as kernels but their
  bytes still counted unfused, so an upper bound). A pack of R runs (``petlbench run --pack R``)
  is one step whose every kernel works on R x the rows (FLOPs and bytes x R, an upper bound on
  the bytes: the shared frozen weights are read once, not R times), whose autocast weight casts
  and launch floors are paid once, and whose host work is the measured packed/single ratio.
  Mergeable methods are evaluated merged (the eval batch is counted on the merged model).

The workload comes from the suite and the method as a sweep would run them: every task's
training-set size and test-set size, the method's paper recipe (``recipes``: ARC trains VTAB at
batch 32 for 100 epochs) and the evaluation batch size.

Modules: :mod:`~petlbench.estimate.workload` (what a sweep runs), :mod:`~petlbench.estimate.counting`
(counted), :mod:`~petlbench.estimate.measure` (measured), :mod:`~petlbench.estimate.gpumodel`
(modelled), :mod:`~petlbench.estimate.assemble` (:func:`estimate`, :func:`remodel`) and
:mod:`~petlbench.estimate.markdown` (the printed breakdown and the verdict).
"""

from petlbench.estimate.assemble import estimate, remodel
from petlbench.estimate.counting import OpCounts, count
from petlbench.estimate.gpumodel import ASSUMPTIONS, GPUS, PACKS, GpuModel, gpu_time, model_gpus
from petlbench.estimate.markdown import TARGET_MIN, to_markdown, verdict
from petlbench.estimate.measure import host_cost_per_op, measure_fixed, measure_per_run, packed_host_ratio
from petlbench.estimate.workload import VTAB_NATIVE_SIZES, TaskLoad, cache_bytes, workload

__all__ = [
    "ASSUMPTIONS", "GPUS", "PACKS", "TARGET_MIN", "VTAB_NATIVE_SIZES", "GpuModel", "OpCounts", "TaskLoad",
    "cache_bytes", "count", "estimate", "gpu_time", "host_cost_per_op", "measure_fixed", "measure_per_run",
    "model_gpus", "packed_host_ratio", "remodel", "to_markdown", "verdict", "workload",
]
