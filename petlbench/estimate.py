"""The modelled time of a whole sweep (VTAB-1k x one method x one seed) from measured costs.

``petlbench bench --sweep-estimate -m arc`` answers "how long will my sweep take on an H100?"
before anyone rents one, and says how it got there. Three kinds of numbers, kept apart in the
output:

- **counted** (exact, device-independent): aten ops, FLOPs and tensor bytes of one training step
  of the method at its real VTAB batch size and of one evaluation batch, on the ``meta`` device
  (no compute, so ViT-B/16 is counted in seconds on any machine);
- **measured** (on this machine): the train step, an evaluation batch, the fixed costs paid per
  run (building the model, hashing the weights, the deployed-latency timing of every record) and
  the host's cost per dispatched op (a structurally identical ViT with tiny tensors);
- **modelled** (per GPU, from vendor data sheets and stated efficiencies): each counted op's
  time on the GPU as a roofline, ``max(FLOPs / (peak x e_mm), bytes / (bandwidth x e_bw))``,
  with a per-kernel floor in eager mode, and the host's dispatch time that eager mode cannot
  hide. "eager" is a step that issues every op from Python (petlbench's default); "compiled" is
  one that issues the step as a whole (torch.compile / CUDA graphs: no host cost per op and no
  launch floor except for matmul-class kernels; elementwise ops fused away as kernels but their
  bytes still counted unfused, so an upper bound).

The workload comes from the suite and the method as a sweep would run them: every task's
training-set size and test-set size, the method's ``train_presets`` (ARC trains VTAB at batch
32 for 100 epochs) and the evaluation batch size.
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


def count(model: nn.Module, batch: int, eval_batch: int, classes: int, size: int, grad_clip: float) -> dict[str, OpCounts]:
    """Counted ops of one steady-state train step (AdamW state exists) and one eval batch, on ``meta``."""
    device = torch.device("meta")
    step, _ = _step_fn(model, batch, classes, size, device, grad_clip)
    step()  # creates the optimiser state
    train = OpCounts()
    with _Recorder(train) as rec, _FlashAttention(rec):
        step(rec)
    _, forward = _step_fn(model, eval_batch, classes, size, device, grad_clip)
    evals = OpCounts()
    with _Recorder(evals) as rec, _FlashAttention(rec):
        forward()
    return {"train_step": train, "eval_batch": evals}


def gpu_time(counts: OpCounts, gpu: GpuModel, host_per_op_s: float, autocast_cast_bytes: int = 0,
             autocast_casts: int = 0) -> dict[str, float]:
    """Modelled seconds of one counted call on ``gpu``: eager (host-issued ops, launch floor, host
    dispatch that cannot be hidden beyond the GPU's own time) and compiled (the GPU work only)."""
    a = ASSUMPTIONS
    peak = gpu.bf16_flops * a["matmul_efficiency"]
    bw = gpu.hbm_bytes_s * a["bandwidth_efficiency"]
    eager = compiled = matmul = 0.0
    for name, flops, nbytes, optimizer in counts.ops:
        if name.endswith("(no data)"):
            continue  # host work only (counted in the host time below)
        moved = nbytes if optimizer else nbytes * a["activation_bytes_factor"]  # AdamW keeps fp32 state
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
    host = (counts.n_ops + autocast_casts) * host_per_op_s
    return {"eager_s": max(eager, host), "eager_gpu_s": eager, "eager_host_s": host, "compiled_s": compiled,
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
        cfg = resolve_train(defaults, method, suite.name, task.name, overrides or {})
        loads.append(TaskLoad(
            task.name, task.classes, int(task.sizes[suite.split_for("train")]), int(task.sizes[suite.split_for("test")]),
            int(cfg["epochs"]), int(cfg["batch_size"]), int(cfg["eval_batch_size"]), bool(cfg["drop_last"]),
        ))
    return loads


def _median_time(fn: Callable[[], Any], warmup: int, iters: int, best: bool = False) -> float:
    """Median (or, ``best``, the minimum: the intrinsic cost on a shared machine) of ``iters`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return min(samples) if best else sorted(samples)[len(samples) // 2]


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


def measure_fixed(model: nn.Module, size: int) -> dict[str, float]:
    """Per-run costs outside training and evaluation, measured: hashing the backbone's weight file
    (SHA-256 at this machine's speed over the fp32 parameter bytes) and the deployed-latency timing
    each record carries."""
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


def estimate(method: str, backbone: str = "vit_base_patch16_224", suite: str = "vtab",
             overrides: Mapping[str, Any] | None = None, backbone_kwargs: Mapping[str, Any] | None = None,
             timing: bool = True, warmup: int = 1, iters: int = 2,
             log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The sweep's modelled time per GPU and its breakdown, with every input labelled."""
    import platform

    import petlbench
    from petlbench.config import resolve_train
    from petlbench.data import get_suite

    loads = workload(suite, method, overrides)
    batches = sorted({t.batch_size for t in loads})
    eval_batches = sorted({t.eval_batch_size for t in loads})
    if len(batches) > 1 or len(eval_batches) > 1:
        raise petlbench.PetlbenchError(f"--sweep-estimate: the tasks of {suite!r} use several batch sizes "
                                       f"({batches}); give one with --batch-size.")
    batch, eval_batch = batches[0], eval_batches[0]
    classes = round(sum(t.classes for t in loads) / len(loads))
    kwargs = dict(backbone_kwargs or {})
    the_suite = get_suite(suite)
    size = int(kwargs.get("img_size", the_suite.image_size))
    cfg = resolve_train(dict(getattr(the_suite, "train_defaults", {}) or {}), petlbench.get_method(method), suite,
                        loads[0].name, overrides or {})
    grad_clip = float(cfg["grad_clip"])

    log(f"sweep-estimate: counting one {method} train step at batch {batch} and one eval batch of {eval_batch} (meta)")
    with torch.device("meta"):
        meta_model = petlbench.create_model(backbone, method, classes, backbone_kwargs=kwargs)
    counted = count(meta_model, batch, eval_batch, classes, size, grad_clip)
    n_linear, linear_params = _linear_weights(meta_model)
    depth = len(getattr(meta_model.net, "blocks", [])) or 12
    log("sweep-estimate: measuring the host's cost per dispatched op")
    host = host_cost_per_op(backbone, kwargs, method, depth)

    measured: dict[str, Any] = {"host": host, "device": f"cpu: {platform.processor() or platform.machine()} "
                                                        f"({torch.get_num_threads()} threads)"}
    if timing:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = petlbench.create_model(backbone, method, classes, backbone_kwargs=kwargs)
        build_s = time.perf_counter() - t0
        log(f"sweep-estimate: timing the train step at batch {batch} on the CPU ({iters} samples)")
        step, _ = _step_fn(model, batch, classes, size, torch.device("cpu"), grad_clip)
        train_s = _median_time(step, warmup, iters)
        eval_at = min(eval_batch, batch)
        _, forward = _step_fn(model, eval_at, classes, size, torch.device("cpu"), grad_clip)
        log(f"sweep-estimate: timing an eval batch of {eval_at} on the CPU")
        eval_s = _median_time(forward, warmup, iters) * eval_batch / eval_at
        fixed = measure_fixed(model, size)
        fixed["build_model_s"] = build_s
        measured.update(train_step_s=train_s, eval_batch_s=eval_s, eval_measured_at_batch=eval_at, fixed=fixed)

    def sweep(step_s: float, eval_s: float, fixed_s: float) -> dict[str, float]:
        train = sum(t.train_steps for t in loads) * step_s
        evals = sum(t.eval_batches for t in loads) * eval_s
        fixed_total = len(loads) * fixed_s
        return {"train_s": train, "eval_s": evals, "fixed_s": fixed_total, "total_s": train + evals + fixed_total}

    fixed_run_s = None
    if timing:
        f = measured["fixed"]
        fixed_run_s = f["build_model_s"] + f["hash_weights_s"] + f["deployed_latency_s"]
        measured["sweep_on_this_cpu"] = sweep(measured["train_step_s"], measured["eval_batch_s"], fixed_run_s)

    cast_bytes = linear_params * 6  # read fp32, write bf16
    modelled: dict[str, Any] = {}
    for key, gpu in GPUS.items():
        tr = gpu_time(counted["train_step"], gpu, host["per_op_s"], cast_bytes, n_linear)
        ev = gpu_time(counted["eval_batch"], gpu, host["per_op_s"], cast_bytes, n_linear)
        # Fixed costs on a GPU host: model build and hashing are host work (taken as measured here);
        # the latency timing takes its minimum samples: (2 warm-up + 11 rounds) x 2 models x 20 ms.
        gpu_fixed = ((measured["fixed"]["build_model_s"] + measured["fixed"]["hash_weights_s"]) if timing else 0.0) \
            + 13 * 2 * 0.02
        modelled[key] = {
            "gpu": asdict(gpu), "train_step": tr, "eval_batch": ev, "fixed_per_run_s": gpu_fixed,
            "eager": sweep(tr["eager_s"], ev["eager_s"], gpu_fixed),
            "compiled": sweep(tr["compiled_s"], ev["compiled_s"], gpu_fixed),
            "matmul_floor": sweep(tr["matmul_floor_s"], ev["matmul_floor_s"], 0.0),
        }
    return {
        "method": method, "backbone": backbone, "backbone_kwargs": kwargs, "suite": suite, "image_size": size,
        "tasks": [asdict(t) | {"train_steps": t.train_steps, "eval_batches": t.eval_batches} for t in loads],
        "batch_size": batch, "eval_batch_size": eval_batch, "epochs": sorted({t.epochs for t in loads}),
        "train_steps": sum(t.train_steps for t in loads), "eval_batches": sum(t.eval_batches for t in loads),
        "test_images": sum(t.test_images for t in loads),
        "counted": {k: v.summary() for k, v in counted.items()} | {"autocast_casts": n_linear,
                                                                 "autocast_cast_bytes": cast_bytes},
        "measured": measured, "assumptions": dict(ASSUMPTIONS), "modelled": modelled,
        "cache": cache_bytes(loads, size, VTAB_NATIVE_SIZES if suite == "vtab" else {}),
        "torch": torch.__version__, "petlbench": petlbench.__version__, "date": time.strftime("%Y-%m-%d"),
    }


def _min(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h"


def to_markdown(r: dict[str, Any]) -> str:
    """The estimate for the terminal and benchmarks/results/*.md, each figure labelled by its kind."""
    c, m = r["counted"], r["measured"]
    lines = [
        f"**Sweep estimate: {r['suite']} ({len(r['tasks'])} tasks) x {r['method']} x 1 seed, {r['backbone']} "
        f"{r['image_size']}px** (petlbench {r['petlbench']}, torch {r['torch']}, {r['date']})",
        "",
        f"Workload (from the suite and the method's train_presets): batch {r['batch_size']}, epochs {r['epochs']}, "
        f"{r['train_steps']:,} train steps, {r['test_images']:,} test images in {r['eval_batches']:,} eval batches "
        f"of {r['eval_batch_size']}.",
        "",
        f"Counted (exact, meta device): train step {c['train_step']['ops']:,} aten ops "
        f"({c['train_step']['kernels']:,} that move data), "
        f"{c['train_step']['flops'] / 1e12:.3f} TFLOP ({c['train_step']['matmul_ops']} matmul-class ops), "
        f"{c['train_step']['bytes'] / 1e9:.2f} GB of fp32 operands (unfused; attention as flash kernels); eval batch "
        f"{c['eval_batch']['ops']:,} ops, {c['eval_batch']['flops'] / 1e12:.3f} TFLOP; autocast casts "
        f"{c['autocast_casts']} Linear weights per forward ({c['autocast_cast_bytes'] / 1e6:.0f} MB moved).",
        "",
        f"Measured on {m['device']}: host cost {1e6 * m['host']['per_op_s']:.1f} us per dispatched op "
        f"(fastest of 15 tiny-tensor steps of the same depth, {m['host']['tiny_step_ops']} ops).",
    ]
    if "train_step_s" in m:
        f = m["fixed"]
        s = m["sweep_on_this_cpu"]
        lines += [
            f"Measured train step {m['train_step_s']:.2f} s, eval batch {m['eval_batch_s']:.2f} s (timed at batch "
            f"{m['eval_measured_at_batch']}, scaled per image); fixed per run: build {f['build_model_s']:.2f} s, "
            f"hash weights {f['hash_weights_s']:.2f} s, deployed-latency timing {f['deployed_latency_s']:.2f} s. "
            f"This sweep on this CPU: {_min(s['total_s'])} (train {_min(s['train_s'])}, eval {_min(s['eval_s'])}, "
            f"fixed {_min(s['fixed_s'])}).",
        ]
    a = r["assumptions"]
    lines += [
        "",
        f"Modelled per GPU (data-sheet bf16 peak and HBM bandwidth; assumed: matmul at "
        f"{a['matmul_efficiency']:.0%} of peak, memory-bound kernels at {a['bandwidth_efficiency']:.0%} of bandwidth, "
        f"{1e6 * a['kernel_floor_s']:.1f} us kernel floor in eager mode, bf16 activations; host cost per op as "
        "measured here):",
        "",
        "| GPU | mode | train step | eval batch | train | eval | fixed | **sweep** |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, g in r["modelled"].items():
        for mode, step_key in (("eager (today)", "eager_s"), ("compiled / graphed", "compiled_s"),
                               ("matmul floor", "matmul_floor_s")):
            sweep = g[{"eager_s": "eager", "compiled_s": "compiled", "matmul_floor_s": "matmul_floor"}[step_key]]
            lines.append(
                f"| {key} | {mode} | {1e3 * g['train_step'][step_key]:.2f} ms | {1e3 * g['eval_batch'][step_key]:.2f} ms"
                f" | {_min(sweep['train_s'])} | {_min(sweep['eval_s'])} | {_min(sweep['fixed_s'])} | "
                f"**{_min(sweep['total_s'])}** |")
        t = g["train_step"]
        lines.append(f"| {key} | eager: GPU vs host | {1e3 * t['eager_gpu_s']:.2f} ms GPU | "
                     f"{1e3 * t['eager_host_s']:.2f} ms host | | | | bound: "
                     f"{'host' if t['eager_host_s'] > t['eager_gpu_s'] else 'GPU'} |")
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
