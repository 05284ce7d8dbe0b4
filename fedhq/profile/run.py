"""Takes a hardware profile: the micro-benchmarks and the training steps of the
project's models, assembled into one schema-versioned document, and its table."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

import torch

import fedhq_kernels as fk
from fedhq.profile import fit, micro, schema, steps, timing

DEFAULT_MODELS = ("small_cnn@32x32x3", "resnet18@32x32x3")
# Batch sizes per model name. Quick: a smoke test under 30 s on a 2-core CPU.
QUICK_BATCHES = {"small_cnn": (8, 32, 128), "resnet18": (1, 2, 4)}
FULL_BATCHES = {"small_cnn": (8, 32, 128, 512), "resnet18": (4, 16, 64)}
CPU_CUDA_SCALE = 4  # GPU profiles use batches this many times larger (a step must fill the device)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_info(device: torch.device, threads: int) -> dict:
    memory, source = timing.device_memory_bytes(device)
    info = {
        "type": device.type,
        "memory_bytes": memory,
        "memory_source": source,
        "threads": threads,
        "cores": os.cpu_count(),
        "cache_bytes": timing.cache_bytes(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        info.update(
            name=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            # the CUDA context and whatever else held the GPU when the profile started
            memory_overhead_bytes=int(total - free - torch.cuda.memory_reserved(device)),
            memory_overhead_source="total - free - torch's reserved memory, at profile start",
        )
    else:
        info.update(
            name=f"{_cpu_name()} ({os.cpu_count()} cores)",
            memory_overhead_bytes=timing.process_rss_bytes(),
            memory_overhead_source="resident set of the profiling process after importing torch and fedhq",
        )
    return info


def software_info(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "fedhq_backends": fk.backends(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "driver": None,
    }
    if device.type == "cuda":
        try:
            import subprocess

            info["driver"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=False,
                )
                .stdout.strip()
                .splitlines()[0]
            )
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def _model_tools():
    """The project's models and strategy preparation live in the ``fedhq`` package
    (same distribution, one layer up); imported only when a model is profiled."""
    try:
        from fedhq.models import ModelSpec, count_parameters
        from fedhq.quant import prepare_ptq, prepare_qat
    except ImportError as error:  # pragma: no cover - both ship in one distribution
        raise RuntimeError(
            f"profiling a model needs the fedhq package ({error}); pass --models none for the micro-benchmarks only"
        ) from error
    return ModelSpec, count_parameters, {"ptq": prepare_ptq, "qat": lambda m: prepare_qat(m, inplace=True)}


def profile_model(
    spec_text: str,
    batches: Sequence[int],
    *,
    device: torch.device,
    repeats: int,
    warmup: int,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[str, dict]:
    """(key, entry) of the profile's ``models`` section for one model spec."""
    ModelSpec, count_parameters, strategies = _model_tools()
    spec = ModelSpec.parse(spec_text)
    log(f"{spec.key}: training steps at batch sizes {list(batches)} ...")
    result = steps.profile_training(
        spec.build,
        spec.input_shape,
        spec.num_classes,
        strategies,
        batches,
        device=device,
        repeats=repeats,
        warmup=warmup,
        log=log,
    )
    entry = {
        "model": spec.name,
        "input_shape": list(spec.input_shape),
        "num_classes": spec.num_classes,
        "params": count_parameters(spec.build()),
        "optimizer": "SGD(lr=0.01, momentum=0.9), cross-entropy",
        "strategies": result,
    }
    for strategy in result.values():
        rows = strategy["batches"]
        xs = [r["batch"] for r in rows]
        if len(xs) >= 2:
            mem = fit.fit_affine(xs, [r["peak_memory_bytes"] for r in rows])
            step = fit.fit_affine(xs, [r["step_s"]["median"] for r in rows])
            strategy["memory_fit"] = {
                "intercept_bytes": mem.intercept,
                "per_sample_bytes": mem.slope,
                "max_rel_residual": mem.max_rel_residual,
            }
            strategy["step_fit"] = {
                "intercept_s": step.intercept,
                "per_sample_s": step.slope,
                "max_rel_residual": step.max_rel_residual,
            }
    if "ptq" in result and "qat" in result:
        ptq = {r["batch"]: r["step_s"]["median"] for r in result["ptq"]["batches"]}
        entry["qat_over_ptq"] = [
            {"batch": r["batch"], "ratio": r["step_s"]["median"] / ptq[r["batch"]]} for r in result["qat"]["batches"]
        ]
    return spec.key, entry


def default_batches(spec_text: str, device: torch.device, quick: bool) -> tuple[int, ...]:
    name = spec_text.split("@")[0].split(":")[0]
    table = QUICK_BATCHES if quick else FULL_BATCHES
    sizes = table.get(name, table["small_cnn"])
    return tuple(b * CPU_CUDA_SCALE for b in sizes) if device.type == "cuda" else sizes


def run_profile(
    *,
    device: str | torch.device = "cpu",
    quick: bool = False,
    models: Sequence[str] | None = DEFAULT_MODELS,
    batches: Sequence[int] | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    micro_sizes: dict | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Measures this machine and returns the profile document (schema.validate-d).
    ``batches`` overrides the per-model defaults; ``models=()`` skips the models;
    ``micro_sizes`` overrides the micro-benchmarks' sizes (micro.default_sizes)."""
    if str(device).split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"profile: device must be cpu or cuda[:N], got {str(device)!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("profile: --device cuda was asked for, but torch sees no CUDA GPU")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"profile: threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    repeats = repeats or (3 if quick else 10)
    warmup = 1 if quick else 3
    started = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    doc: dict = {
        "schema": schema.SCHEMA,
        "schema_version": schema.SCHEMA_VERSION,
        "kind": "measured",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "device": device_info(device, torch.get_num_threads()),
        "software": software_info(device),
    }
    doc["figures"] = micro.run_micro(device, quick=quick, repeats=max(repeats, 5), sizes=micro_sizes, log=log)
    doc["models"] = {}
    for spec_text in models or ():
        sizes = tuple(batches) if batches else default_batches(spec_text, device, quick)
        key, entry = profile_model(spec_text, sizes, device=device, repeats=repeats, warmup=warmup, log=log)
        doc["models"][key] = entry
    doc["conditions"] = {
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": warmup,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "memory_method": (
            "torch.cuda.max_memory_allocated"
            if device.type == "cuda"
            else f"live heap ({timing.heap_method()}) sampled after every ATen op of a step"
        ),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "seconds": round(time.perf_counter() - started, 1),
        "command": " ".join(sys.argv),
    }
    return schema.validate(doc, "measured profile")


def contention_warning(doc: dict) -> str | None:
    """A line saying the timings are suspect when other processes kept the CPUs busy."""
    cond = doc.get("conditions", {})
    load = max(v for v in (cond.get("load_average_start"), cond.get("load_average_end"), 0.0) if v is not None)
    cores = doc.get("device", {}).get("cores") or 1
    threads = cond.get("threads", cores)
    if doc.get("device", {}).get("type") != "cpu" or load <= 0.5 + max(0, cores - threads):
        return None
    message = (
        f"WARNING: load average {load:.1f} on {cores} cores while profiling: other processes competed for the "
        "CPUs, so step times are inflated and noisy (see the p10-p90 spread); re-run on an idle machine for "
        "figures of the machine itself."
    )
    if threads > 1 and (cond.get("omp_wait_policy") or "").upper() != "PASSIVE":
        message += (
            " With OpenMP's default wait policy a multi-thread team also stalls whenever another process holds a "
            "core (measured: a small-CNN step took ~300 ms instead of ~7 ms): set OMP_WAIT_POLICY=PASSIVE before "
            "starting Python (the fedhq command does), or use --threads 1."
        )
    return message


# ---- the table ----


def _fmt(fig, scale: float = 1.0, digits: int = 2) -> tuple[str, str]:
    if not isinstance(fig, dict) or fig.get("median") is None:
        return "n/a", ""
    med = f"{fig['median'] * scale:.{digits}f}"
    if fig.get("p10") is None:
        return med, "datasheet/estimate" if fig.get("source") else ""
    return med, f"{fig['p10'] * scale:.{digits}f}-{fig['p90'] * scale:.{digits}f}"


def _load(value) -> str:
    return "?" if value is None else f"{value:.1f}"


def format_table(doc: dict) -> str:
    dev, sw, figs = doc["device"], doc.get("software", {}), doc["figures"]
    if doc.get("kind") == "preset":
        header = (
            f"Preset: {dev['name']} [{dev['type']}], {dev['memory_bytes'] / 2**30:.1f} GiB "
            "(datasheet figures x estimated efficiencies)"
        )
    else:
        header = (
            f"Device: {dev['name']} [{dev['type']}], {dev.get('threads', '?')} threads, "
            f"{dev['memory_bytes'] / 2**30:.1f} GiB; torch {sw.get('torch', '?')}; "
            f"fedhq backends {sw.get('fedhq_backends', '?')}; {doc.get('timestamp', '')}"
            + (" (--quick)" if doc.get("quick") else "")
        )
    lines = [header, "", "| figure | median | p10-p90 |", "| --- | --- | --- |"]
    rows = [
        ("copy bandwidth, preallocated (GB/s)", figs.get("copy_bandwidth_gbps"), 1, 1),
        ("read bandwidth, sum (GB/s)", figs.get("read_bandwidth_gbps"), 1, 1),
        ("copy bandwidth, allocating clone (GB/s)", figs.get("alloc_copy_bandwidth_gbps"), 1, 1),
    ]
    for dtype, fig in (figs.get("matmul_tflops") or {}).items():
        if dtype == "unsupported":
            continue
        unit = "TOPS" if dtype == "int8" else "TFLOP/s"
        n = f", n={fig['n']}" if isinstance(fig, dict) and "n" in fig else ""
        rows.append((f"matmul {dtype} ({unit}{n})", fig, 1, 3))
    rows.append(("tiny-op dispatch/launch (us)", figs.get("launch_overhead_us"), 1, 1))
    for op, fig in (figs.get("quant_ops_gbps") or {}).items():
        rows.append((f"fedhq {op} (GB/s)", fig, 1, 1))
    rows.append(("fedhq fake_quant, 1024 elements (us/call)", figs.get("fake_quant_small_latency_us"), 1, 1))
    for label, fig, scale, digits in rows:
        med, spread = _fmt(fig, scale, digits)
        lines.append(f"| {label} | {med} | {spread} |")
    models = doc.get("models") or {}
    if models:
        lines += [
            "",
            "| model | params | strategy | batch | step ms | p10-p90 ms | peak MiB | QAT/FP32 step |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for key, entry in models.items():
            ratios = {r["batch"]: r["ratio"] for r in entry.get("qat_over_ptq", [])}
            for strategy, data in entry["strategies"].items():
                for row in data["batches"]:
                    med, spread = _fmt(row["step_s"], 1e3, 2)
                    ratio = f"{ratios[row['batch']]:.2f}x" if strategy == "qat" and row["batch"] in ratios else ""
                    lines.append(
                        f"| {key} | {entry['params'] / 1e6:.2f}M | {strategy} | {row['batch']} | {med} | {spread} | "
                        f"{row['peak_memory_bytes'] / 2**20:.1f} | {ratio} |"
                    )
        lines.append("")
        for key, entry in models.items():
            for strategy, data in entry["strategies"].items():
                m, s = data.get("memory_fit"), data.get("step_fit")
                if m and s:
                    lines.append(
                        f"{key} {strategy}: memory(B) = {m['intercept_bytes'] / 2**20:.1f} MiB + "
                        f"{m['per_sample_bytes'] / 2**10:.1f} KiB x B (max residual {m['max_rel_residual']:.0%}); "
                        f"step(B) = {s['intercept_s'] * 1e3:.2f} ms + {s['per_sample_s'] * 1e3:.3f} ms x B "
                        f"(max residual {s['max_rel_residual']:.0%})"
                    )
    cond = doc.get("conditions") or {}
    if cond:
        lines.append(
            f"\nmedian of {cond.get('repeats')} timed steps after {cond.get('warmup')} warm-up; peak memory = "
            f"parameters + optimizer state + batch + peak growth during a step ({cond.get('memory_method')}); "
            f"load average {_load(cond.get('load_average_start'))} -> {_load(cond.get('load_average_end'))}; "
            f"OMP_WAIT_POLICY {cond.get('omp_wait_policy') or 'unset'}; "
            f"{cond.get('seconds')} s"
        )
    warning = contention_warning(doc)
    if warning:
        lines.append(warning)
    return "\n".join(lines)
