"""Where a step's GPU time goes, per layer: profiled kernels grouped by name into the parts of
a Grok-1 layer (one table, `GROUPS`), so that a run at reduced depth says what the full model
would do: per-layer time x 64 + the once-per-step work (bench/parallel_decode.py --breakdown).

Every layer runs the same launches, so of a kernel's c calls a step, c // layers a layer are
per-layer work and the c % layers left over run once a step (the embedding, the unembedding,
the final norm after 2 norms a layer, the runner's input gathers), each call its mean time. A
once-a-step kernel with `layers` calls or more would pass for per-layer work: profile at a depth
above such counts. The kernels each row was built from stay in the result, so a misfiled name
can be seen; names no pattern matches go to "other".
"""

from __future__ import annotations

import re

# (group, pattern searched in the kernel name), first match wins. Triton kernels are named
# after their functions in grok1/ops/*_triton.py; NCCL's are ncclDevKernel_*; cuBLAS's GEMMs
# (nvjet_*, *gemm*, cutlass) run only the unembedding in an int8 Grok-1 step (the attention
# and expert matrices go through the Triton kernels); the runner's forward holds no sampling,
# so top-k and sorts there are the router's.
GROUPS: tuple[tuple[str, str], ...] = (
    ("all-reduce", r"(?i)nccl|all_?reduce|all_?gather|reduce_?scatter|one_?shot|two_?shot"),
    ("attention projections", r"gemv3_kernel|\blinear_kernel"),
    ("attention", r"paged_attention_kernel|attention_combine_kernel|flash|fmha"),
    ("MoE gate/up", r"moe_(mma_)?gemv_gate_up_kernel|moe_gate_up_kernel|moe_gelu_combine"),
    ("MoE down", r"moe_(mma_)?gemv_down_kernel|moe_down_kernel"),
    ("router", r"router_|moe_align_kernel|(?i:topk)|bitonicSort|radixSort"),
    ("norms", r"(?i)rms_?norm|layer_?norm"),
    ("rope/cache", r"(?i)rope|cache_kernel"),
    ("unembed/sampling", r"nvjet|(?i:gemm)|cutlass|(?i:argmax)|(?i:sampl)"),
)
GROUP_NAMES = tuple(g for g, _ in GROUPS) + ("other",)
_COMPILED = [(g, re.compile(p)) for g, p in GROUPS]


def group_of(kernel: str) -> str:
    """The group (GROUPS) of a kernel name; "other" when no pattern matches."""
    return next((g for g, p in _COMPILED if p.search(kernel)), "other")


def breakdown(kernels: list[tuple[str, int, float]], steps: int, layers: int,
              full_layers: int) -> dict:
    """kernels: (name, calls, total us) over `steps` profiled steps of a `layers`-layer model.
    -> {"per_layer_us": {group: us}, "per_step_us": {group: us} (the once-a-step work),
    "layer_us", "step_once_us", "step_us" (measured depth), "full_model_ms" (at full_layers:
    layer_us x full_layers + step_once_us), "kernels": [{name, group, calls_per_layer,
    calls_per_step, us_per_step}], largest first}."""
    per_layer = dict.fromkeys(GROUP_NAMES, 0.0)
    once = dict.fromkeys(GROUP_NAMES, 0.0)
    rows = []
    for name, calls, us in kernels:
        group = group_of(name)
        per_step = calls / steps
        a_layer = per_step // layers  # calls in each layer
        mean_us = us / calls
        per_layer[group] += a_layer * mean_us
        once[group] += (per_step - a_layer * layers) * mean_us
        rows.append({"name": name, "group": group, "calls_per_layer": a_layer,
                     "calls_per_step": per_step, "us_per_step": us / steps})
    layer_us, once_us = sum(per_layer.values()), sum(once.values())
    return {"per_layer_us": per_layer, "per_step_us": once, "layer_us": layer_us,
            "step_once_us": once_us, "step_us": layer_us * layers + once_us,
            "layers": layers, "steps": steps, "full_layers": full_layers,
            "full_model_ms": (layer_us * full_layers + once_us) / 1e3,
            "kernels": sorted(rows, key=lambda r: -r["us_per_step"])}


def kernel_times(prof) -> list[tuple[str, int, float]]:
    """(name, calls, total us) of each device kernel (and memcpy/memset) a torch.profiler run
    recorded: the events with device time of their own."""
    out = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None)
        if us is None:  # older torch: the CUDA-only name
            us = evt.self_cuda_time_total
        if us > 0:
            out.append((evt.key, evt.count, float(us)))
    return out


def describe(b: dict, what: str) -> str:
    """One line per group: us per layer, us once a step, and the full-depth estimate."""
    lines = [f"{what}: {b['layer_us']:.1f} us/layer + {b['step_once_us']:.1f} us/step once "
             f"-> {b['full_layers']} layers {b['full_model_ms']:.2f} ms"]
    for g in GROUP_NAMES:
        if b["per_layer_us"][g] or b["per_step_us"][g]:
            lines.append(f"    {g:<22} {b['per_layer_us'][g]:8.1f} us/layer "
                         f"{b['per_step_us'][g]:8.1f} us/step once")
    return "\n".join(lines)
