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
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry


@dataclass(frozen=True)
class GpuModel:
    """A GPU as the model sees it: dense bf16 tensor-core peak and HBM bandwidth (data sheets)."""

    name: str
    bf16_flops: float
    hbm_bytes_s: float


GPUS: dict[str, GpuModel] = {
    "H100": GpuModel("H100 SXM 80 GB (HBM3)", 989e12, 3.35e12),
    "H200": GpuModel("H200 SXM 141 GB (HBM3e)", 989e12, 4.8e12),
}

#: Stated assumptions of the GPU model (not measured here: no GPU in this environment).
ASSUMPTIONS: dict[str, float] = {
    "matmul_efficiency": 0.70,  # fraction of the bf16 peak a ViT-B GEMM reaches (cuBLAS, H100 class)
    "bandwidth_efficiency": 0.80,  # fraction of HBM bandwidth a memory-bound kernel reaches
    "kernel_floor_s": 2.5e-6,  # shortest kernel, launch to completion, when issued one by one
    "activation_bytes_factor": 0.5,  # bf16 autocast: float activations counted in fp32, moved as bf16
}

# Where each VTAB-1k task's images are no larger than 224x224 and of one size (TFDS native sizes,
# kept by NOAH's export): the cache stores them so; every other task at 224x224.
VTAB_NATIVE_SIZES: dict[str, tuple[int, int]] = {
    "cifar": (32, 32), "svhn": (32, 32), "patch_camelyon": (96, 96), "eurosat": (64, 64),
    "dsprites_loc": (64, 64), "dsprites_ori": (64, 64), "smallnorb_azi": (96, 96), "smallnorb_ele": (96, 96),
}

_MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward",
               "flash_attention_forward", "flash_attention_backward",
               "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
               "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
               "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"}


@dataclass
class OpCounts:
    """Counted work of one call: per-op (name, FLOPs, bytes, optimiser phase) and totals."""

    ops: list[tuple[str, int, int, bool]] = field(default_factory=list)

    @property
    def n_ops(self) -> int:
        return len(self.ops)

    @property
    def flops(self) -> int:
        return sum(f for _, f, _, _ in self.ops)

    @property
    def bytes(self) -> int:
        return sum(b for _, _, b, _ in self.ops)

    def summary(self) -> dict[str, Any]:
        mm = [o for o in self.ops if o[0] in _MATMUL_OPS]
        return {"ops": self.n_ops, "kernels": sum(not o[0].endswith("(no data)") for o in self.ops),
                "flops": self.flops, "bytes": self.bytes, "matmul_ops": len(mm),
                "matmul_flops": sum(f for _, f, _, _ in mm)}


# Ops that move no data (views, reshapes of the same storage, allocations): host work, no kernel.
_NO_TRAFFIC = {"_unsafe_view", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
               "new_empty_strided", "zeros_like", "_to_copy_meta"}


def _nbytes(*tensors: Any) -> int:
    seen: set[int] = set()
    total = 0
    for t in tree_leaves(tensors):
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class _Recorder(TorchDispatchMode):
    """Records every aten op with its FLOPs (torch's formulas) and the bytes its kernel moves
    (every tensor operand read or written once; zero for views and allocations)."""

    def __init__(self, counts: OpCounts) -> None:
        super().__init__()
        self.counts = counts
        self.optimizer_phase = False

    def record(self, name: str, flops: int, nbytes: int) -> None:
        self.counts.ops.append((name, flops, nbytes, self.optimizer_phase))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        name = packet.__name__
        flops = int(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0
        moves = not (func.is_view or name in _NO_TRAFFIC)
        self.record(name if moves else f"{name} (no data)", flops, _nbytes(args, kwargs, out) if moves else 0)
        return out


class _FusedAttention(torch.autograd.Function):
    """Scaled dot-product attention counted as the fused (flash) kernels a GPU runs, instead of
    the math path ``meta`` falls back to (which materialises every N x N score matrix)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rec: _Recorder) -> torch.Tensor:
        ctx.rec = rec
        ctx.save_for_backward(q, k, v)
        out = torch.empty_like(q)
        flops = 4 * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1]
        ctx.flops = flops
        rec.record("flash_attention_forward", flops, _nbytes(q, k, v, out))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        q, k, v = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        # recomputes the scores and runs five matmuls where the forward ran two
        ctx.rec.record("flash_attention_backward", int(2.5 * ctx.flops), _nbytes(q, k, v, grad, grad, dq, dk, dv))
        return dq, dk, dv, None


class _FlashAttention(torch.overrides.TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` (plain calls, as timm's ViT makes) to :class:`_FusedAttention`."""

    def __init__(self, rec: _Recorder) -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        plain = not kwargs.get("attn_mask") and len(args) == 3 and not kwargs.get("dropout_p")
        if func is nn.functional.scaled_dot_product_attention and plain:
            return _FusedAttention.apply(*args, self.rec)
        return func(*args, **kwargs)


def _step_fn(model: nn.Module, batch: int, classes: int, size: int, device: torch.device, grad_clip: float
             ) -> tuple[Callable[[_Recorder | None], None], Callable[[], None]]:
    """(train step, eval forward): the engine's step order (zero_grad, forward, fp32 cross-entropy,
    backward, clip, AdamW) without autocast, which ``meta`` does not support (its casts are
    modelled separately). The step tells a recorder when the optimiser phase starts and ends."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)

    def step(rec: _Recorder | None = None) -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        if rec is not None:
            rec.optimizer_phase = True
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        if rec is not None:
            rec.optimizer_phase = False

    @torch.no_grad()
    def forward() -> None:
        model.eval()
        model(x).argmax(dim=-1)

    return step, forward


def count(model: nn.Module, batch: int, eval_batch: int, classes: int, size: int, grad_clip: float,
          eval_model: nn.Module | None = None) -> dict[str, OpCounts]:
    """Counted ops of one steady-state train step (AdamW state exists) and one eval batch, on
    ``meta``; the eval batch on ``eval_model`` when given (the merged model, as the engine evaluates)."""
    device = torch.device("meta")
    step, _ = _step_fn(model, batch, classes, size, device, grad_clip)
    step()  # creates the optimiser state
    train = OpCounts()
    with _Recorder(train) as rec, _FlashAttention(rec):
        step(rec)
    _, forward = _step_fn(eval_model if eval_model is not None else model, eval_batch, classes, size, device,
                          grad_clip)
    evals = OpCounts()
    with _Recorder(evals) as rec, _FlashAttention(rec):
        forward()
    return {"train_step": train, "eval_batch": evals}


def gpu_time(counts: OpCounts, gpu: GpuModel, host_per_op_s: float, autocast_cast_bytes: int = 0,
             autocast_casts: int = 0, pack: int = 1, pack_host_ratio: float = 1.0) -> dict[str, float]:
    """Modelled seconds of one counted call on ``gpu``: eager (host-issued ops, launch floor, host
    dispatch that cannot be hidden beyond the GPU's own time) and compiled (the GPU work only).

    ``pack`` R > 1: one packed step of R runs (every op on R x the rows; casts and launch floors
    once; host work ``pack_host_ratio`` x one run's). The times are the whole pack's."""
    a = ASSUMPTIONS
    peak = gpu.bf16_flops * a["matmul_efficiency"]
    bw = gpu.hbm_bytes_s * a["bandwidth_efficiency"]
    eager = compiled = matmul = 0.0
    for name, flops, nbytes, optimizer in counts.ops:
        if name.endswith("(no data)"):
            continue  # host work only (counted in the host time below)
        moved = (nbytes if optimizer else nbytes * a["activation_bytes_factor"]) * pack  # AdamW keeps fp32 state
        flops *= pack
        if name in _MATMUL_OPS:
            t = max(flops / peak, moved / bw)
            matmul += flops / peak
            compiled += max(t, a["kernel_floor_s"])  # stays its own kernel when compiled
        else:
            t = moved / bw
            compiled += t  # fused into a neighbour when compiled: no kernel of its own
        eager += max(t, a["kernel_floor_s"])
    cast_t = autocast_cast_bytes / bw  # autocast re-casts the frozen fp32 weights every forward
    compiled += cast_t
    eager += cast_t + autocast_casts * a["kernel_floor_s"]
    host = (counts.n_ops + autocast_casts) * host_per_op_s * (pack_host_ratio if pack > 1 else 1.0)
    # compile=true compiles the backbone; the AdamW phase stays eager (one optimiser per packed run):
    # its host work must fit under the GPU's time, or it bounds the compiled step.
    tail_host = sum(1 for o in counts.ops if o[3]) * host_per_op_s * pack
    return {"eager_s": max(eager, host), "eager_gpu_s": eager, "eager_host_s": host,
            "compiled_s": max(compiled, tail_host), "compiled_gpu_s": compiled, "compiled_host_s": tail_host,
            "matmul_floor_s": matmul}


def _linear_weights(model: nn.Module) -> tuple[int, int]:
    """(count, parameters) of the Linear weights autocast casts to bf16 in each forward."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return len(linears), sum(m.weight.numel() for m in linears)


@dataclass(frozen=True)
class TaskLoad:
    name: str
    classes: int
    train_images: int
    test_images: int
    epochs: int
    batch_size: int
    eval_batch_size: int
    drop_last: bool

    @property
    def train_steps(self) -> int:
        per_epoch = self.train_images // self.batch_size if self.drop_last else -(-self.train_images // self.batch_size)
        return self.epochs * per_epoch

    @property
    def eval_batches(self) -> int:
        return -(-self.test_images // self.eval_batch_size)


def workload(suite_name: str, method_name: str, overrides: Mapping[str, Any] | None = None) -> list[TaskLoad]:
    """Every task of the suite as the sweep would run it (default protocol: train on the train
    role's split, evaluate once on the test role's split at the end)."""
    from petlbench.config import resolve_train
    from petlbench.data import get_suite
    from petlbench.registry import get_method

    suite = get_suite(suite_name)
    method = get_method(method_name)
    defaults = dict(getattr(suite, "train_defaults", {}) or {})
    loads = []
    for task in suite.tasks:
        cfg = resolve_train(defaults, method, suite.name, task.name, overrides or {}, protocol="paper")
        loads.append(TaskLoad(
            task.name, task.classes, int(task.sizes[suite.split_for("train")]), int(task.sizes[suite.split_for("test")]),
            int(cfg["epochs"]) + int(cfg["cooldown_epochs"]), int(cfg["batch_size"]), int(cfg["eval_batch_size"]), bool(cfg["drop_last"]),
        ))
    return loads


def _median_time(fn: Callable[[], Any], warmup: int, iters: int, best: bool = False) -> float:
    """Median (or, ``best``, the minimum: the intrinsic cost on a shared machine) seconds per call on
    the CPU, timed by :func:`petlbench.bench.interleaved` (sub-millisecond calls repeated per sample)."""
    from petlbench.bench import interleaved

    t = interleaved({"fn": fn}, torch.device("cpu"), warmup, iters)["fn"]
    return t["min_s"] if best else t["median_s"]


def host_cost_per_op(backbone: str, backbone_kwargs: Mapping[str, Any], method: str, depth: int, iters: int = 15
                     ) -> dict[str, float]:
    """Seconds of host work per dispatched op: the method's train step on a ViT of the same depth
    with tiny tensors (dim 16, 4 tokens, batch 2), whose compute is negligible, divided by its ops."""
    import petlbench

    kwargs = {**backbone_kwargs, "img_size": 32, "patch_size": 16, "embed_dim": 16, "num_heads": 1, "depth": depth}
    torch.manual_seed(0)
    tiny = petlbench.create_model(backbone, method, 10, backbone_kwargs=kwargs)
    step, _ = _step_fn(tiny, 2, 10, 32, torch.device("cpu"), 1.0)
    step()
    counts = OpCounts()
    with _Recorder(counts):
        step()
    t = _median_time(step, 3, iters, best=True)
    return {"per_op_s": t / counts.n_ops, "tiny_step_s": t, "tiny_step_ops": counts.n_ops}


def packed_host_ratio(backbone: str, backbone_kwargs: Mapping[str, Any], method: str, depth: int, pack: int,
                      iters: int = 15) -> dict[str, Any]:
    """Host seconds of one packed step of ``pack`` runs over one run's step, measured with the same
    tiny-tensor ViT as :func:`host_cost_per_op` (compute negligible: what is left is host work)
    through the packed engine's own step (:func:`petlbench.packing.packed_step`)."""
    import petlbench
    from petlbench.packing import PackedForward, pack_problem, packed_step, share_frozen
    from petlbench.precision import resolve_precision

    kwargs = {**backbone_kwargs, "img_size": 32, "patch_size": 16, "embed_dim": 16, "num_heads": 1, "depth": depth}
    cpu = torch.device("cpu")
    models = []
    for seed in range(pack):
        torch.manual_seed(seed)
        models.append(petlbench.create_model(backbone, method, 10, backbone_kwargs=kwargs, reuse_backbone=True))
    cfgs = [{"label_smoothing": 0.0, "grad_clip": 1.0, "compile": False, "precision": "fp32", "epochs": 1,
             "batch_size": 2}] * pack
    problem = pack_problem(models, cfgs, [range(1)] * pack, cpu)  # equal-size stand-ins for loaders
    if problem:
        return {"pack": pack, "ratio": None, "cannot_pack": problem}
    share_frozen(models)
    params = [[q for q in m.parameters() if q.requires_grad] for m in models]
    opts = [torch.optim.AdamW(ps, lr=1e-3) for ps in params]
    forward = PackedForward(models)
    xs, ys = torch.randn(pack, 2, 3, 32, 32), torch.randint(0, 10, (pack, 2))
    plan = resolve_precision("fp32", cpu)
    for m in models:
        m.train()
    packed_s = _median_time(lambda: packed_step(forward, params, opts, xs, ys, cfgs, plan, cpu), 3, iters, best=True)
    single = host_cost_per_op(backbone, backbone_kwargs, method, depth, iters)
    return {"pack": pack, "ratio": packed_s / single["tiny_step_s"], "tiny_packed_step_s": packed_s,
            "tiny_step_s": single["tiny_step_s"]}


def measure_per_run(backbone: str, backbone_kwargs: Mapping[str, Any], method: str, classes: int) -> dict[str, float]:
    """Per-run host costs left once the backbone is cached, measured: a model from the cache (a deep
    copy with a new head, the method applied) and the copy of the backbone the latency timing makes."""
    import copy

    import petlbench

    petlbench.create_model(backbone, method, classes, backbone_kwargs=backbone_kwargs, reuse_backbone=True)  # warm
    t0 = time.perf_counter()
    model = petlbench.create_model(backbone, method, classes, backbone_kwargs=backbone_kwargs, reuse_backbone=True)
    reset_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    copy.deepcopy(model.net)
    return {"model_from_cache_s": reset_s, "latency_copy_s": time.perf_counter() - t0}


def measure_fixed(model: nn.Module, size: int) -> dict[str, float]:
    """Costs outside training and evaluation, measured: hashing the backbone's weight file (SHA-256
    at this machine's speed over the fp32 parameter bytes; once per process) and the deployed-latency
    timing each record carries (per run)."""
    from petlbench.bench import deployed_latency

    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buf = bytes(64 << 20)
    t0 = time.perf_counter()
    hashlib.sha256(buf).digest()
    hash_s = (time.perf_counter() - t0) * nbytes / len(buf)
    t0 = time.perf_counter()
    deployed_latency(model, torch.device("cpu"), size, "fp32", iters=11)
    return {"hash_weights_s": hash_s, "deployed_latency_s": time.perf_counter() - t0, "weight_bytes": nbytes}


def cache_bytes(loads: list[TaskLoad], size: int, native: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    """Bytes the decode cache writes for the train and test splits of every task, at ``size`` and native."""
    full = sum((t.train_images + t.test_images) * size * size * 3 for t in loads)
    def pixels(name: str) -> int:  # stored natively only when no larger than the input (load_images' rule)
        h, w = native.get(name, (size, size))
        return min(h * w, size * size)

    nat = sum((t.train_images + t.test_images) * pixels(t.name) * 3 for t in loads)
    return {"at_input_size_bytes": full, "native_bytes": nat}


#: Packs the model reports besides one run at a time: three seeds of one method in one step.
PACKS = (3,)
#: Latency timing per record on a GPU, modelled: (2 warm-up + 11 rounds) x 2 models x the 20 ms
#: minimum sample of :func:`petlbench.bench.deployed_latency` (batch-1 forwards take less).
GPU_LATENCY_TIMING_S = 13 * 2 * 0.02
#: Host-to-device copy of a run's model (pageable memory), modelled.
H2D_BYTES_S = 12e9


def _setup(method: str, backbone: str, suite: str, overrides: Mapping[str, Any] | None,
           backbone_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The workload and the step's shapes, as a sweep would run them."""
    import petlbench
    from petlbench.config import resolve_train
    from petlbench.data import get_suite

    loads = workload(suite, method, overrides)
    batches = sorted({t.batch_size for t in loads})
    eval_batches = sorted({t.eval_batch_size for t in loads})
    if len(batches) > 1 or len(eval_batches) > 1:
        raise petlbench.PetlbenchError(f"--sweep-estimate: the tasks of {suite!r} use several batch sizes "
                                       f"({batches}); give one with --batch-size.")
    kwargs = dict(backbone_kwargs or {})
    the_suite = get_suite(suite)
    cfg = resolve_train(dict(getattr(the_suite, "train_defaults", {}) or {}), petlbench.get_method(method), suite,
                        loads[0].name, overrides or {}, protocol="paper")
    return {"loads": loads, "batch": batches[0], "eval_batch": eval_batches[0], "kwargs": kwargs,
            "classes": round(sum(t.classes for t in loads) / len(loads)),
            "size": int(kwargs.get("img_size", the_suite.image_size)), "grad_clip": float(cfg["grad_clip"])}


def _count(method: str, backbone: str, setup: Mapping[str, Any]) -> tuple[dict[str, OpCounts], dict[str, Any], int]:
    """Counted train step and eval batch (merged when the method merges, as the engine evaluates)."""
    import petlbench
    from petlbench.model import merge

    with torch.device("meta"):
        meta_model = petlbench.create_model(backbone, method, setup["classes"], backbone_kwargs=setup["kwargs"])
    merged = merge(meta_model) if meta_model.method.mergeable else None
    counted = count(meta_model, setup["batch"], setup["eval_batch"], setup["classes"], setup["size"],
                    setup["grad_clip"], eval_model=merged)
    n_linear, linear_params = _linear_weights(meta_model)
    extra = {"autocast_casts": n_linear, "autocast_cast_bytes": linear_params * 6,  # read fp32, write bf16
             "eval_merged": merged is not None}
    return counted, extra, len(getattr(meta_model.net, "blocks", [])) or 12


def _sweep(loads: list[TaskLoad], step_s: float, eval_s: float, per_process_s: float, per_run_s: float,
           pack: int = 1) -> dict[str, float]:
    """One sweep of ``pack`` seeds (one process, packs of ``pack`` runs): totals, and per run-equivalent
    (what one seed's sweep costs)."""
    train = sum(t.train_steps for t in loads) * step_s  # step_s: the whole pack's step
    evals = pack * sum(t.eval_batches for t in loads) * eval_s  # each run evaluates its own model
    fixed = per_process_s + pack * len(loads) * per_run_s
    total = train + evals + fixed
    return {"pack": pack, "train_s": train, "eval_s": evals, "fixed_s": fixed, "total_s": total,
            "per_run_s": total / pack}


def model_gpus(loads: list[TaskLoad], counted: Mapping[str, OpCounts], extra: Mapping[str, Any],
               host_per_op_s: float, pack_ratios: Mapping[int, float | None], fixed: Mapping[str, float]
               ) -> dict[str, Any]:
    """The modelled sweep per GPU, mode (eager, compiled) and pack size, from counted and measured inputs.

    ``fixed``: ``build_model_s`` and ``hash_weights_s`` (paid once per process: the backbone cache),
    ``model_from_cache_s``, ``latency_copy_s`` and ``weight_bytes`` (per run)."""
    per_process = fixed.get("build_model_s", 0.0) + fixed.get("hash_weights_s", 0.0)
    per_run = fixed.get("model_from_cache_s", 0.0) + fixed.get("latency_copy_s", 0.0) \
        + GPU_LATENCY_TIMING_S + fixed.get("weight_bytes", 0.0) / H2D_BYTES_S
    casts, cast_bytes = extra["autocast_casts"], extra["autocast_cast_bytes"]
    out: dict[str, Any] = {}
    for key, gpu in GPUS.items():
        tr = gpu_time(counted["train_step"], gpu, host_per_op_s, cast_bytes, casts)
        ev = gpu_time(counted["eval_batch"], gpu, host_per_op_s, cast_bytes, casts)
        g: dict[str, Any] = {
            "gpu": asdict(gpu), "train_step": tr, "eval_batch": ev, "fixed_per_process_s": per_process,
            "fixed_per_run_s": per_run,
            "eager": _sweep(loads, tr["eager_s"], ev["eager_s"], per_process, per_run),
            "compiled": _sweep(loads, tr["compiled_s"], ev["compiled_gpu_s"], per_process, per_run),
            "matmul_floor": _sweep(loads, tr["matmul_floor_s"], ev["matmul_floor_s"], 0.0, 0.0),
            "packs": {},
        }
        for pack, ratio in pack_ratios.items():
            if ratio is None:
                continue
            tp = gpu_time(counted["train_step"], gpu, host_per_op_s, cast_bytes, casts, pack=pack, pack_host_ratio=ratio)
            g["packs"][str(pack)] = {
                "train_step": tp,
                "eager": _sweep(loads, tp["eager_s"], ev["eager_s"], per_process, per_run, pack),
                "compiled": _sweep(loads, tp["compiled_s"], ev["compiled_gpu_s"], per_process, per_run, pack),
            }
        out[key] = g
    return out


def estimate(method: str, backbone: str = "vit_base_patch16_224", suite: str = "vtab",
             overrides: Mapping[str, Any] | None = None, backbone_kwargs: Mapping[str, Any] | None = None,
             timing: bool = True, warmup: int = 1, iters: int = 2,
             log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The sweep's modelled time per GPU and its breakdown, with every input labelled."""
    import petlbench
    from petlbench.bench import device_peak

    setup = _setup(method, backbone, suite, overrides, backbone_kwargs)
    loads, batch, eval_batch, classes, size, kwargs = (setup[k] for k in ("loads", "batch", "eval_batch", "classes",
                                                                          "size", "kwargs"))
    log(f"sweep-estimate: counting one {method} train step at batch {batch} and one eval batch of {eval_batch} (meta)")
    counted, extra, depth = _count(method, backbone, setup)
    log("sweep-estimate: measuring the host's cost per dispatched op, one run and packed")
    host = host_cost_per_op(backbone, kwargs, method, depth)
    packs = {r: packed_host_ratio(backbone, kwargs, method, depth, r) for r in PACKS}

    measured: dict[str, Any] = {"host": host, "packed_host": {str(r): v for r, v in packs.items()},
                                "device": device_peak(torch.device("cpu"))[0]}
    fixed: dict[str, float] = {}
    if timing:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = petlbench.create_model(backbone, method, classes, backbone_kwargs=kwargs)
        build_s = time.perf_counter() - t0
        log(f"sweep-estimate: timing the train step at batch {batch} on the CPU ({iters} samples)")
        step, _ = _step_fn(model, batch, classes, size, torch.device("cpu"), setup["grad_clip"])
        train_s = _median_time(step, warmup, iters)
        eval_at = min(eval_batch, batch)
        _, forward = _step_fn(model, eval_at, classes, size, torch.device("cpu"), setup["grad_clip"])
        log(f"sweep-estimate: timing an eval batch of {eval_at} on the CPU")
        eval_s = _median_time(forward, warmup, iters) * eval_batch / eval_at
        fixed = {**measure_fixed(model, size), "build_model_s": build_s,
                 **measure_per_run(backbone, kwargs, method, classes)}
        measured.update(train_step_s=train_s, eval_batch_s=eval_s, eval_measured_at_batch=eval_at, fixed=fixed)
        per_run_cpu = fixed["model_from_cache_s"] + fixed["deployed_latency_s"]
        measured["sweep_on_this_cpu"] = _sweep(loads, train_s, eval_s, build_s + fixed["hash_weights_s"], per_run_cpu)

    return {
        "method": method, "backbone": backbone, "backbone_kwargs": kwargs, "suite": suite, "image_size": size,
        "tasks": [asdict(t) | {"train_steps": t.train_steps, "eval_batches": t.eval_batches} for t in loads],
        "batch_size": batch, "eval_batch_size": eval_batch, "epochs": sorted({t.epochs for t in loads}),
        "train_steps": sum(t.train_steps for t in loads), "eval_batches": sum(t.eval_batches for t in loads),
        "test_images": sum(t.test_images for t in loads),
        "counted": {k: v.summary() for k, v in counted.items()} | extra,
        "measured": measured, "assumptions": dict(ASSUMPTIONS) | {"gpu_latency_timing_s": GPU_LATENCY_TIMING_S,
                                                                  "h2d_bytes_s": H2D_BYTES_S},
        "modelled": model_gpus(loads, counted, extra, host["per_op_s"],
                               {r: v["ratio"] for r, v in packs.items()}, fixed),
        "cache": cache_bytes(loads, size, VTAB_NATIVE_SIZES if suite == "vtab" else {}),
        "torch": torch.__version__, "petlbench": petlbench.__version__, "date": time.strftime("%Y-%m-%d"),
    }


def remodel(saved: Mapping[str, Any], log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The modelled table of a saved estimate (``--sweep-estimate --json``) under today's model,
    without timing ViT-B on the CPU again (it takes the better part of an hour on one thread).

    Kept from ``saved`` (measured then): the train step and eval batch on the CPU, the host cost per
    op, building and hashing the backbone. Counted again (seconds, ``meta``): the train step, whose
    counts must equal the saved ones, and the eval batch as the engine evaluates it (merged for
    mergeable methods). Measured now (seconds): the packed/single host ratio and the per-run model
    copy. The result says which is which under ``measured["remodelled"]``."""
    import copy

    import petlbench

    method, backbone, suite = saved["method"], saved["backbone"], saved["suite"]
    setup = _setup(method, backbone, suite, None, saved.get("backbone_kwargs"))
    loads = setup["loads"]
    if sum(t.train_steps for t in loads) != saved["train_steps"] or setup["batch"] != saved["batch_size"]:
        raise petlbench.PetlbenchError("the saved estimate was made with training overrides (batch size or epochs "
                                       "differ from the method's presets): run --sweep-estimate again instead.")
    log(f"remodel: counting one {method} train step at batch {setup['batch']} (meta)")
    counted, extra, depth = _count(method, backbone, setup)
    same = counted["train_step"].summary() == saved["counted"]["train_step"]
    if not same:
        raise petlbench.PetlbenchError("the saved estimate's train-step counts differ from today's code: "
                                       "run --sweep-estimate again instead of remodelling it.")
    m = copy.deepcopy(dict(saved["measured"]))
    log("remodel: measuring the packed/single host ratio and the per-run model copy")
    packs = {r: packed_host_ratio(backbone, setup["kwargs"], method, depth, r) for r in PACKS}
    m["packed_host"] = {str(r): v for r, v in packs.items()}
    fixed = dict(m.get("fixed") or {})
    fixed.update(measure_per_run(backbone, setup["kwargs"], method, setup["classes"]))
    if "weight_bytes" not in fixed:
        fixed["weight_bytes"] = saved["counted"].get("autocast_cast_bytes", 0) / 6 * 4
    m["fixed"] = fixed
    if "train_step_s" in m:
        per_run_cpu = fixed["model_from_cache_s"] + fixed.get("deployed_latency_s", 0.0)
        m["sweep_on_this_cpu"] = _sweep(loads, m["train_step_s"], m["eval_batch_s"],
                                        fixed.get("build_model_s", 0.0) + fixed.get("hash_weights_s", 0.0), per_run_cpu)
    m["remodelled"] = {
        "date": time.strftime("%Y-%m-%d"), "saved_date": saved.get("date"),
        "kept_from_saved": ["train_step_s", "eval_batch_s", "host.per_op_s", "fixed.build_model_s",
                            "fixed.hash_weights_s", "fixed.deployed_latency_s"],
        "counted_again": ["train_step (equal to the saved counts)", "eval_batch (as evaluated: "
                          + ("merged" if extra["eval_merged"] else "unmerged") + ")"],
        "measured_now": ["packed_host", "fixed.model_from_cache_s", "fixed.latency_copy_s"],
    }
    out = copy.deepcopy(dict(saved))
    out.update(
        measured=m, counted={k: v.summary() for k, v in counted.items()} | extra,
        assumptions=dict(ASSUMPTIONS) | {"gpu_latency_timing_s": GPU_LATENCY_TIMING_S, "h2d_bytes_s": H2D_BYTES_S},
        modelled=model_gpus(loads, counted, extra, m["host"]["per_op_s"], {r: v["ratio"] for r, v in packs.items()},
                            fixed),
        petlbench=petlbench.__version__, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
    )
    return out


def _min(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h"


#: The product's target: one VTAB-1k sweep of one method (one seed) on one H100/H200.
TARGET_MIN = 7.0


def verdict(r: Mapping[str, Any], target_min: float = TARGET_MIN) -> list[tuple[str, str, int, float]]:
    """(GPU, mode, runs per step, modelled minutes per seed's sweep) of every mode that meets the target."""
    met = []
    for key, g in r["modelled"].items():
        rows = [("eager", 1, g["eager"]), ("compiled", 1, g["compiled"])]
        rows += [(mode, int(R), pk[mode]) for R, pk in g.get("packs", {}).items() for mode in ("eager", "compiled")]
        met += [(key, mode, R, sw["per_run_s"] / 60) for mode, R, sw in rows if sw["per_run_s"] / 60 <= target_min]
    return met


def to_markdown(r: dict[str, Any]) -> str:
    """The estimate for the terminal and benchmarks/results/*.md, each figure labelled by its kind."""
    c, m = r["counted"], r["measured"]
    lines = [
        f"**Sweep estimate: {r['suite']} ({len(r['tasks'])} tasks) x {r['method']} x 1 seed, {r['backbone']} "
        f"{r['image_size']}px** (petlbench {r['petlbench']}, torch {r['torch']}, {r['date']})",
        "",
        f"Workload (from the suite and the method's paper recipe): batch {r['batch_size']}, epochs {r['epochs']}, "
        f"{r['train_steps']:,} train steps, {r['test_images']:,} test images in {r['eval_batches']:,} eval batches "
        f"of {r['eval_batch_size']}.",
        "",
        f"Counted (exact, meta device): train step {c['train_step']['ops']:,} aten ops "
        f"({c['train_step']['kernels']:,} that move data), "
        f"{c['train_step']['flops'] / 1e12:.3f} TFLOP ({c['train_step']['matmul_ops']} matmul-class ops), "
        f"{c['train_step']['bytes'] / 1e9:.2f} GB of fp32 operands (unfused; attention as flash kernels); eval batch "
        f"({'merged, as the engine evaluates a mergeable method' if c.get('eval_merged') else 'unmerged'}) "
        f"{c['eval_batch']['ops']:,} ops, {c['eval_batch']['flops'] / 1e12:.3f} TFLOP; autocast casts "
        f"{c['autocast_casts']} Linear weights per forward ({c['autocast_cast_bytes'] / 1e6:.0f} MB moved).",
        "",
        f"Measured on {m['device']}: host cost {1e6 * m['host']['per_op_s']:.1f} us per dispatched op "
        f"(fastest of 15 tiny-tensor steps of the same depth, {m['host']['tiny_step_ops']} ops).",
    ]
    for R, ph in (m.get("packed_host") or {}).items():
        lines.append(f"Measured host cost of a packed step of {R} runs (the packed engine, same tiny ViT): "
                     + (f"{ph['ratio']:.2f} x one run's step." if ph.get("ratio") is not None
                        else f"not packable ({ph.get('cannot_pack')})."))
    if "train_step_s" in m:
        f = m["fixed"]
        s = m["sweep_on_this_cpu"]
        lines += [
            f"Measured train step {m['train_step_s']:.2f} s, eval batch {m['eval_batch_s']:.2f} s (timed at batch "
            f"{m['eval_measured_at_batch']}, scaled per image); once per process: build {f['build_model_s']:.2f} s, "
            f"hash weights {f['hash_weights_s']:.2f} s; per run: model from the backbone cache "
            f"{f.get('model_from_cache_s', float('nan')):.2f} s, deployed-latency timing "
            f"{f['deployed_latency_s']:.2f} s on this CPU (its backbone copy {f.get('latency_copy_s', float('nan')):.2f} s). "
            f"This sweep on this CPU: {_min(s['total_s'])} (train {_min(s['train_s'])}, eval {_min(s['eval_s'])}, "
            f"fixed {_min(s['fixed_s'])}).",
        ]
    if "remodelled" in m:
        rm = m["remodelled"]
        lines.append(f"Re-modelled on {rm['date']} from the estimate of {rm['saved_date']}: kept as measured then: "
                     f"{', '.join(rm['kept_from_saved'])}; counted again: {', '.join(rm['counted_again'])}; "
                     f"measured now: {', '.join(rm['measured_now'])}.")
    a = r["assumptions"]
    g0 = next(iter(r["modelled"].values()))
    lines += [
        "",
        f"Modelled per GPU (data-sheet bf16 peak and HBM bandwidth; assumed: matmul at "
        f"{a['matmul_efficiency']:.0%} of peak, memory-bound kernels at {a['bandwidth_efficiency']:.0%} of bandwidth, "
        f"{1e6 * a['kernel_floor_s']:.1f} us kernel floor in eager mode, bf16 activations; host cost per op as "
        f"measured here). Fixed costs: {g0['fixed_per_process_s']:.1f} s once per process (build + hash, measured "
        f"here) and {g0['fixed_per_run_s']:.2f} s per run (model from the cache and the latency timing's copy, "
        f"measured here; the latency timing itself modelled at {a.get('gpu_latency_timing_s', 0.52):.2f} s; "
        "the host-to-device copy modelled). A pack of R runs (`petlbench run --pack R`, e.g. three seeds) is one "
        "step on R x the rows (FLOPs and bytes x R: an upper bound, the shared frozen weights are read once), its "
        "casts and launch floors once, its host work the measured packed ratio; each run still evaluates its own "
        "model and carries its own latency timing. \"compiled\": the step's GPU work issued as a whole, bounded "
        "below by the host work of the AdamW phase, which stays eager (counted ops x host cost per op, x R in a "
        "pack). **per seed** = the whole pack's time / R.",
        "",
        "| GPU | mode | runs per step | train step (whole step) | eval batch | train | eval | fixed | **sweep per seed** |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, g in r["modelled"].items():
        rows = []
        for mode, step_key, label in (("eager", "eager_s", "eager (default)"),
                                      ("compiled", "compiled_s", "compiled / graphed")):
            rows.append((label, 1, g["train_step"][step_key], g["eval_batch"][step_key], g[mode]))
            for R, pk in g.get("packs", {}).items():
                rows.append((label, int(R), pk["train_step"][step_key], g["eval_batch"][step_key], pk[mode]))
        rows.append(("matmul floor", 1, g["train_step"]["matmul_floor_s"], g["eval_batch"]["matmul_floor_s"],
                     {**g["matmul_floor"], "per_run_s": g["matmul_floor"].get("per_run_s", g["matmul_floor"]["total_s"])}))
        for label, R, step_s, eval_s, sw in rows:
            lines.append(f"| {key} | {label} | {R} | {1e3 * step_s:.2f} ms | {1e3 * eval_s:.2f} ms | "
                         f"{_min(sw['train_s'])} | {_min(sw['eval_s'])} | {_min(sw['fixed_s'])} | "
                         f"**{_min(sw['per_run_s'])}** |")
        t = g["train_step"]
        lines.append(f"| {key} | eager: GPU vs host | 1 | {1e3 * t['eager_gpu_s']:.2f} ms GPU | "
                     f"{1e3 * t['eager_host_s']:.2f} ms host | | | | bound: "
                     f"{'host' if t['eager_host_s'] > t['eager_gpu_s'] else 'GPU'} |")
        lines.append(f"| {key} | compiled: GPU vs eager AdamW host | 1 | {1e3 * t['compiled_gpu_s']:.2f} ms GPU | "
                     f"{1e3 * t['compiled_host_s']:.2f} ms host | | | | bound: "
                     f"{'host' if t['compiled_host_s'] > t['compiled_gpu_s'] else 'GPU'} |")
    met = verdict(r)
    lines += ["", f"Target (one VTAB-1k sweep of one method, one seed, <= {TARGET_MIN:.0f} min on one H100/H200), "
              "in this model: " + ("met by " + "; ".join(f"{k} {mode} with {R} run(s) per step ({t:.2f} min)"
                                                       for k, mode, R, t in met) + "." if met else "not met in any mode.")
              + " Modelled, not measured on a GPU."]
    cache = r["cache"]
    lines += [
        "",
        f"Decode cache written by the first sweep (train + test splits): {cache['at_input_size_bytes'] / 1e9:.1f} GB "
        f"at {r['image_size']}x{r['image_size']}, {cache['native_bytes'] / 1e9:.1f} GB with native-resolution "
        "storage (TFDS native sizes of the 8 tasks whose images are smaller; modelled from the image counts).",
    ]
    if not math.isfinite(r["modelled"]["H100"]["eager"]["total_s"]):  # pragma: no cover - defensive
        lines.append("- note: the model produced a non-finite time")
    return "\n".join(lines)
