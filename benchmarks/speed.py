"""Speed benchmark: seconds per q_v iteration and per theta/q_f step, peak memory, whole-registration time, and
scaling with the number of processes and of voxels.

Every configuration (transformation x metric x baseline/learnt x grid) runs in a fresh Python process, so that
the peak resident set size (``ru_maxrss``) of one does not bleed into the next; on CUDA the peak is
``torch.cuda.max_memory_allocated``. The objects are the production ones, built by ``trainer.build`` from
``configs/demo/train.json`` with the grid, metric and transformation overridden; the images are uniform
random numbers in [0, 1] inside a spherical mask (the cost does not depend on the content).

    python -m benchmarks.speed --grids 64 --device cpu --out benchmarks/results/speed_cpu.json
    python -m benchmarks.speed --grids 64 --models SVF --metrics SSD --processes 1 2 --out ...
    python -m benchmarks.speed --grids 64 --compare main --rounds 3 --out ...

Times are medians over ``--repeats`` iterations after ``--warmup`` iterations; the spread is given as the
interquartile range and the extremes. ``--append`` merges the results into an existing JSON file.

``--compare REV`` checks out the git revision REV into a temporary worktree (removed at the end) and times
every configuration there and in the working tree, in ``--rounds`` interleaved rounds (REV, then the working
tree, each in a fresh process with the same threads and seed); the ratio of the medians over the rounds, and
the median of the per-round ratios, say how much faster the working tree is. Interleaving makes the ratios
robust to a load that changes slowly, as on a shared machine.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from model.energy import ContrastiveLoss, Energy
from model.variational import QF, QV
from trainer.build import build_energy, build_similarity
from trainer.q_v_inference import fit_q_v, infer_q_v
from utils.config import QVTestConfig, parse_config
from utils.distributed import all_reduce_mean, barrier, setup, teardown

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo" / "train.json"
TRANSFORMATIONS = {"SVF": "SVF_3D", "SVFFD": "SVFFD_3D"}
W_REG = {"SSD": 1.8, "LCC": 2.0}  # the reference's regulariser weights (METHOD.md)
KEY_FIELDS = ("device", "model", "metric", "variant", "grid", "batch", "threads", "flush_denormal", "channels_last",
              "compile", "cuda_graph")


# ----------------------------------------------------------------------------------------------- set-up


def machine_info(device: str) -> dict:
    """Where the numbers were measured: host, CPU, torch build, threads, load."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "environment": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                                             "KMP_BLOCKTIME")},
            "loadavg_start": list(os.getloadavg())}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def make_config(model: str, metric: str, variant: str, grid: int, batch: int, cps: int,
                channels_last: bool = False) -> QVTestConfig:
    """The demo training config with the benchmark's transformation, metric, grid, batch size and flags."""
    data = json.loads(DEMO_CONFIG.read_text())
    data["model"]["type"] = f"CNN_{metric}"
    data["model"]["args"]["learnable"] = variant == "learnt"
    data["data_loss"]["type"] = metric
    data["reg_loss"]["args"]["w_reg"] = W_REG[metric]
    data["transformation_module"] = {"type": TRANSFORMATIONS[model], "args": {"no_steps": 12}}
    if model == "SVFFD":
        data["transformation_module"]["args"]["cps"] = [cps] * 3
    data["data_loader"]["args"]["dims"] = [grid] * 3
    data["data_loader"]["args"]["batch_size"] = batch
    if channels_last:
        data["trainer"]["channels_last"] = True
    return parse_config(data, DEMO_CONFIG.parent, f"{DEMO_CONFIG} (benchmark overrides)", mode="test")


def make_images(dims: list[int], batch: int, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    """Fixed (the same atlas for every pair) and moving images (B, 1, *dims) in [0, 1]; a spherical fixed mask."""
    generator = torch.Generator().manual_seed(seed)
    fixed = torch.rand((1, 1, *dims), generator=generator).repeat(batch, 1, 1, 1, 1)
    moving = torch.rand((batch, 1, *dims), generator=generator)
    axes = [torch.linspace(-1.0, 1.0, n) for n in dims]
    radius = sum(a.view([-1 if i == k else 1 for i in range(3)]) ** 2 for k, a in enumerate(axes)).sqrt()
    mask = (radius <= 0.9).float().expand(batch, 1, *dims).contiguous()
    return fixed.to(device), moving.to(device), mask.to(device)


def build(config: QVTestConfig, device: torch.device) -> tuple[Energy, ContrastiveLoss | None]:
    """Energy and contrastive loss (None for a baseline metric), as the Trainer builds them."""
    similarity = build_similarity(config)
    energy = build_energy(config, similarity).to(device)
    contrastive = None
    if similarity.learnable:
        q_f = QF(config.data_loader.args.dims, config.q_f.args.sigma_init, config.q_f.args.u_init)
        contrastive = ContrastiveLoss(similarity, q_f).to(device)
    return energy, contrastive


def initial_q_v(config: QVTestConfig, energy: Energy, batch: int, device: torch.device) -> QV:
    """The initial q_v of ``batch`` pairs (mu 0, sigma_v_init, u_v_init)."""
    args = config.data_loader.args
    return QV.initial(batch, energy.transformation.velocity_shape, args.sigma_v_init, args.u_v_init, device)


def q_v_options(spec: dict) -> dict:
    """Keyword arguments of fit_q_v that differ from its defaults."""
    options = {} if spec["flush_denormal"] in (True, None) else {"flush_denormal": False}
    if spec.get("cuda_graph"):
        options["cuda_graph"] = True
    if spec.get("compile") and "compile_loss" in inspect.signature(fit_q_v).parameters:
        options["compile_loss"] = True
    return options


def flush_option_of_the_code(requested: bool) -> bool | None:
    """What the q_v loop does with subnormals: ``requested``, or None for code without the option (no flushing)."""
    return requested if "flush_denormal" in inspect.signature(fit_q_v).parameters else None


def synchronize(device: torch.device) -> None:
    """Wait for the GPU, so that wall-clock stamps include its work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mib() -> float:
    """Current resident set size of this process (Linux), MiB."""
    try:
        with open("/proc/self/status") as file:
            return next(int(line.split()[1]) for line in file if line.startswith("VmRSS")) / 1024.0
    except (OSError, StopIteration):
        return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 ** 2 if sys.platform == "darwin" else 1024.0)


def summary(times: list[float]) -> dict:
    """Median, quartiles and extremes of a list of durations (s)."""
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "q1": quartiles[0], "q3": quartiles[2], "min": min(times),
            "max": max(times), "n": len(times)}


# ------------------------------------------------------------------------------ one configuration (a worker)


def theta_step(energy: Energy, contrastive: torch.nn.Module, optimizers: list[torch.optim.Optimizer], q_v: QV,
               fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor) -> None:
    """One theta/q_f step as in Trainer.train_batch: a sample of q_v, then the contrastive loss."""
    warped = energy.sample_warped(q_v, moving)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    contrastive(fixed, warped, mask).backward()
    for optimizer in optimizers:
        optimizer.step()


def bench_configuration(spec: dict) -> dict:
    """Time the q_v iterations, the theta/q_f step and (optionally) a whole registration of one configuration."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    spec = spec | {"flush_denormal": flush_option_of_the_code(spec["flush_denormal"]),
                   "cuda_graph": spec.get("cuda_graph", False)}
    config = make_config(spec["model"], spec["metric"], spec["variant"], spec["grid"], spec["batch"], spec["cps"],
                         spec["channels_last"])
    energy, contrastive = build(config, device)
    if spec["compile"] and "compile_loss" not in inspect.signature(fit_q_v).parameters:
        # code before trainer.q_v_compile: the q_v loss through TorchInductor, as fit_q_v(compile_loss=True) does;
        # the compile time shows in q_v_first_iteration_s (inductor draws its own random numbers)
        energy.q_v_loss = torch.compile(energy.q_v_loss)
    fixed, moving, mask = make_images(config.data_loader.args.dims, spec["batch"], device, spec["seed"])
    lr = config.optimizer_q_v.args.lr
    result = {k: spec[k] for k in KEY_FIELDS} | {"cps": spec["cps"] if spec["model"] == "SVFFD" else None,
                                               "loadavg_start": list(os.getloadavg()),
                                               "rss_setup_mib": rss_mib()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # q_v iterations: the production loop, time-stamped by its logging hook after every optimizer step
    stamps: list[tuple[float, float]] = []

    def stamp(iteration, terms):
        synchronize(device)
        stamps.append((time.perf_counter(), time.process_time()))

    q_v = initial_q_v(config, energy, spec["batch"], device)
    synchronize(device)
    start = (time.perf_counter(), time.process_time())
    fit_q_v(energy, q_v, fixed, moving, mask, spec["warmup"] + spec["repeats"], lr, log_period=1, log=stamp,
            **q_v_options(spec))
    times = [b[0] - a[0] for a, b in zip([start] + stamps[:-1], stamps)]
    cpu_times = [b[1] - a[1] for a, b in zip([start] + stamps[:-1], stamps)]
    result["q_v_iteration_s"] = summary(times[spec["warmup"]:])
    result["q_v_iteration_cpu_s"] = summary(cpu_times[spec["warmup"]:])
    result["q_v_first_iteration_s"] = times[0]
    result["peak_rss_q_v_mib"] = peak_rss_mib()
    if device.type == "cuda":
        result["peak_cuda_q_v_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        torch.cuda.reset_peak_memory_stats(device)

    if contrastive is not None and spec["theta_repeats"] > 0:
        optimizers = [torch.optim.Adam(contrastive.similarity.parameters(), lr=config.optimizer_q_phi.args.lr),
                      torch.optim.Adam(contrastive.q_f.parameters(), lr=config.optimizer_q_f.args.lr)]
        times, cpu_times = [], []
        for _ in range(spec["theta_warmup"] + spec["theta_repeats"]):
            synchronize(device)
            begin, begin_cpu = time.perf_counter(), time.process_time()
            theta_step(energy, contrastive, optimizers, q_v, fixed, moving, mask)
            synchronize(device)
            times.append(time.perf_counter() - begin)
            cpu_times.append(time.process_time() - begin_cpu)
        result["theta_step_s"] = summary(times[spec["theta_warmup"]:])
        result["theta_step_cpu_s"] = summary(cpu_times[spec["theta_warmup"]:])
        if device.type == "cuda":
            result["peak_cuda_theta_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20

    if spec["whole_registration"] > 0:
        # one pair from the initial q_v: Adam set-up, f(F) and all iterations
        synchronize(device)
        begin, begin_cpu = time.perf_counter(), time.process_time()
        infer_q_v(energy, fixed[:1], moving[:1], mask[:1], config, no_iters=spec["whole_registration"],
                  **q_v_options(spec))
        synchronize(device)
        result["whole_registration"] = {"iterations": spec["whole_registration"], "pairs": 1,
                                        "seconds": time.perf_counter() - begin,
                                        "cpu_seconds": time.process_time() - begin_cpu}
    result["peak_rss_mib"] = peak_rss_mib()
    result["loadavg_end"] = list(os.getloadavg())
    return result


def run_in_subprocess(spec: dict, root: Path = ROOT) -> dict:
    """bench_configuration of the code in ``root`` in a fresh interpreter, so that its peak memory is its own."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, "-m", "benchmarks.speed", "--worker", json.dumps(spec), "--worker-out", str(out)]
        environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run(command, cwd=root, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"benchmark worker in {root} failed for {spec}:\n{done.stdout[-4000:]}")
        return json.loads(out.read_text())


# ------------------------------------------------------------------------- comparison with a git revision


def git(*arguments: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *arguments], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def code_state(root: Path = ROOT) -> dict:
    """Commit of ``root`` and whether its tracked files differ from it."""
    return {"commit": git("rev-parse", "HEAD", cwd=root),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", cwd=root))}


@contextmanager
def revision_worktree(revision: str) -> Iterator[Path]:
    """A temporary detached git worktree of ``revision``; removed (and pruned) on exit, whatever happens."""
    commit = git("rev-parse", "--verify", f"{revision}^{{commit}}")
    folder = Path(tempfile.mkdtemp(prefix="learnsim-speed-"))
    tree = folder / "tree"
    try:
        git("worktree", "add", "--detach", str(tree), commit)
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)


def compare_rounds(spec: dict, revision_root: Path, rounds: int) -> tuple[dict, list[dict], list[dict]]:
    """``rounds`` x (revision, working tree), interleaved; the comparison row and both lists of results."""
    before, after = [], []
    for _ in range(rounds):
        before.append(run_in_subprocess(spec, revision_root))
        after.append(run_in_subprocess(spec, ROOT))
    row = {k: spec[k] for k in KEY_FIELDS} | {"rounds": rounds}
    for name in ("q_v_iteration_s", "q_v_iteration_cpu_s", "theta_step_s", "theta_step_cpu_s"):
        if all(name in r for r in before + after):
            a = [r[name]["median"] for r in before]
            b = [r[name]["median"] for r in after]
            row[name] = {"revision": a, "working_tree": b,
                         "ratio_of_medians": statistics.median(a) / statistics.median(b),
                         "median_of_ratios": statistics.median(x / y for x, y in zip(a, b))}
    for name in ("peak_rss_q_v_mib", "peak_rss_mib", "peak_cuda_q_v_mib", "peak_cuda_theta_mib"):
        if all(name in r for r in before + after):
            row[name] = {"revision": max(r[name] for r in before), "working_tree": max(r[name] for r in after)}
    row["loadavg"] = [r["loadavg_start"][0] for r in before + after]
    return row, before, after


# ----------------------------------------------------------------------------- scaling with processes


def _scaling_rank(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    """One rank of the process-scaling run: every rank registers its own pairs, then one DDP theta/q_f step."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(spec["threads"])
    context = setup(spec["device"])
    device = context.device
    torch.manual_seed(spec["seed"] + rank)
    config = make_config(spec["model"], spec["metric"], spec["variant"], spec["grid"], spec["batch"], spec["cps"],
                         spec["channels_last"])
    energy, contrastive = build(config, device)
    step_module, optimizers = None, []
    if contrastive is not None:
        step_module = (DistributedDataParallel(contrastive, device_ids=[device.index] if device.type == "cuda"
                                               else None) if context.distributed else contrastive)
        optimizers = [torch.optim.Adam(contrastive.similarity.parameters(), lr=config.optimizer_q_phi.args.lr),
                      torch.optim.Adam(contrastive.q_f.parameters(), lr=config.optimizer_q_f.args.lr)]
    fixed, moving, mask = make_images(config.data_loader.args.dims, spec["batch"], device, spec["seed"] + rank)

    def train_batch(no_iters: int) -> None:
        q_v, _ = infer_q_v(energy, fixed, moving, mask, config, no_iters=no_iters, **q_v_options(spec))
        if step_module is not None:
            theta_step(energy, step_module, optimizers, q_v, fixed, moving, mask)

    train_batch(spec["warmup"])
    synchronize(device)
    barrier(context)
    begin = time.perf_counter()
    for _ in range(spec["batches"]):
        train_batch(spec["iterations"])
    synchronize(device)
    elapsed = time.perf_counter() - begin
    barrier(context)  # the slowest rank sets the pace
    slowest = torch.tensor([elapsed], device=device)
    if context.distributed:
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
    mean = all_reduce_mean(torch.tensor([elapsed], device=device), context)
    if context.is_main:
        pairs = world * spec["batch"] * spec["batches"]
        Path(out).write_text(json.dumps({
            **{k: spec[k] for k in ("device", "model", "metric", "variant", "grid", "batch", "channels_last")},
            "flush_denormal": flush_option_of_the_code(spec["flush_denormal"]),
            "processes": world, "threads_per_process": spec["threads"], "pairs": pairs,
            "iterations_per_pair": spec["iterations"], "seconds": slowest.item(), "mean_rank_seconds": mean.item(),
            "pairs_per_s": pairs / slowest.item(), "pair_iterations_per_s": pairs * spec["iterations"] / slowest.item(),
            "backend": torch.distributed.get_backend() if context.distributed else None,
            "loadavg_end": list(os.getloadavg())}))
    teardown()


def free_port() -> int:
    """A free TCP port on the loopback interface for the process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_scaling(world: int, spec: dict) -> dict:
    """``world`` ranks of _scaling_rank; rank 0's result."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "scaling.json"
        mp.spawn(_scaling_rank, args=(world, free_port(), spec, str(out)), nprocs=world, join=True)
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------- reporting


def voxel_scaling(results: list[dict]) -> list[dict]:
    """Time per q_v iteration relative to the smallest grid of the same configuration, against the voxel ratio."""
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r.get(k) for k in KEY_FIELDS if k != "grid"), []).append(r)
    for members in groups.values():
        members = sorted(members, key=lambda r: r["grid"])
        base = members[0]
        for r in members[1:]:
            if r["grid"] == base["grid"]:  # another round of the same configuration
                continue
            rows.append({**{k: r.get(k) for k in KEY_FIELDS if k != "grid"}, "from_grid": base["grid"],
                         "to_grid": r["grid"], "voxel_ratio": (r["grid"] / base["grid"]) ** 3,
                         "time_ratio": r["q_v_iteration_s"]["median"] / base["q_v_iteration_s"]["median"]})
    return rows


def _flags(r: dict) -> str:
    flags = [name for name, on in (("FTZ", r.get("flush_denormal")), ("CL", r.get("channels_last")),
                                   ("compile", r.get("compile")), ("graph", r.get("cuda_graph"))) if on]
    return "+".join(flags) or "-"


def format_table(report: dict) -> str:
    """Markdown tables of the results and of the scaling runs."""
    lines = ["| device | model | metric | variant | grid | batch | threads | flags | q_v s/iter median [q1, q3] "
             "(min-max, n) | q_v CPU s/iter | theta/q_f s/step median [q1, q3] | peak RSS MiB (q_v / all) "
             "| peak CUDA MiB | whole reg. s (iters) |",
             "|" + "---|" * 14]
    for r in report["results"]:
        q, c = r["q_v_iteration_s"], r["q_v_iteration_cpu_s"]
        t = r.get("theta_step_s")
        theta = f"{t['median']:.4f} [{t['q1']:.4f}, {t['q3']:.4f}]" if t else "-"
        cuda = f"{r['peak_cuda_q_v_mib']:.0f}" if "peak_cuda_q_v_mib" in r else "-"
        whole = (f"{r['whole_registration']['seconds']:.2f} ({r['whole_registration']['iterations']})"
                 + (f", CPU {r['whole_registration']['cpu_seconds']:.2f}" if "cpu_seconds" in r["whole_registration"]
                    else "") if "whole_registration" in r else "-")
        lines.append(f"| {r['device']} | {r['model']} | {r['metric']} | {r['variant']} | {r['grid']}^3 | {r['batch']} "
                     f"| {r['threads']} | {_flags(r)} | {q['median']:.4f} [{q['q1']:.4f}, {q['q3']:.4f}] "
                     f"({q['min']:.4f}-{q['max']:.4f}, {q['n']}) | {c['median']:.4f} | {theta} "
                     f"| {r['peak_rss_q_v_mib']:.0f} / {r['peak_rss_mib']:.0f} | {cuda} | {whole} |")
    if report.get("comparison"):
        comparison = report["comparison"]
        lines += ["", f"Against {comparison['revision']} ({comparison['commit'][:10]}), {comparison['rounds']} "
                      "interleaved round(s): medians over rounds, revision -> working tree; speed-up = ratio of the "
                      "medians (median of the per-round ratios)", "",
                  "| model | metric | variant | grid | threads | q_v s/iter | speed-up | q_v CPU s/iter | speed-up (CPU) "
                  "| theta/q_f s/step | speed-up | peak RSS MiB |", "|" + "---|" * 12]

        def cell(row: dict, name: str) -> tuple[str, str]:
            x = row.get(name)
            if not x:
                return "-", "-"
            return (f"{statistics.median(x['revision']):.4f} -> {statistics.median(x['working_tree']):.4f}",
                    f"{x['ratio_of_medians']:.2f}x ({x['median_of_ratios']:.2f}x)")

        for row in comparison["rows"]:
            memory = row.get("peak_rss_mib")
            memory = f"{memory['revision']:.0f} -> {memory['working_tree']:.0f}" if memory else "-"
            cells = [c for name in ("q_v_iteration_s", "q_v_iteration_cpu_s", "theta_step_s") for c in cell(row, name)]
            lines.append(f"| {row['model']} | {row['metric']} | {row['variant']} | {row['grid']}^3 | {row['threads']} "
                         f"| {' | '.join(cells)} | {memory} |")
    scaling = report.get("scaling", {})
    if scaling.get("processes"):
        spec = scaling.get("spec") or {}
        lines += ["", f"Scaling with processes: {spec.get('model')} {spec.get('metric')} {spec.get('variant')} "
                      f"{spec.get('grid')}^3, batch {spec.get('batch')}, {spec.get('batches')} batch(es) per process, "
                      "each q_v inference then one theta/q_f step (DDP)", "",
                  "| processes | threads/process | pairs | iterations/pair | s (slowest rank) | pairs/s "
                  "| pair-iterations/s |", "|" + "---|" * 7]
        for x in scaling["processes"]:
            lines.append(f"| {x['processes']} | {x['threads_per_process']} | {x['pairs']} | {x['iterations_per_pair']} "
                         f"| {x['seconds']:.2f} | {x['pairs_per_s']:.4f} | {x['pair_iterations_per_s']:.2f} |")
    if scaling.get("voxels"):
        lines += ["", "| model | metric | variant | threads | flags | grids | voxel ratio | time ratio |",
                  "|" + "---|" * 8]
        for x in scaling["voxels"]:
            lines.append(f"| {x['model']} | {x['metric']} | {x['variant']} | {x['threads']} | {_flags(x)} "
                         f"| {x['from_grid']}^3 -> {x['to_grid']}^3 | {x['voxel_ratio']:.2f} | {x['time_ratio']:.2f} |")
    return "\n".join(lines)


def merge(old: dict, new: dict) -> dict:
    """Results of ``new`` replace those of ``old`` with the same key; runs are listed in order."""
    key = lambda r: tuple(r.get(k) for k in KEY_FIELDS)  # noqa: E731
    replaced = {key(r) for r in new["results"]}
    results = [r for r in old["results"] if key(r) not in replaced] + new["results"]
    key_runs = lambda x: (x["processes"], x["threads_per_process"])  # noqa: E731
    new_processes = new["scaling"].get("processes", [])
    replaced_runs = {key_runs(x) for x in new_processes}
    processes = [x for x in old.get("scaling", {}).get("processes", []) if key_runs(x) not in replaced_runs]
    scaling_spec = new["scaling"].get("spec") or old.get("scaling", {}).get("spec")
    merged = {"runs": old.get("runs", []) + new["runs"], "results": results,
              "scaling": {"spec": scaling_spec, "processes": processes + new_processes,
                          "voxels": voxel_scaling(results)}}
    before, after = old.get("comparison"), new.get("comparison")
    if before and after and before["commit"] == after["commit"]:  # more configurations against the same revision
        merged["comparison"] = after | {"rows": before["rows"] + after["rows"],
                                        "revision_results": before["revision_results"] + after["revision_results"]}
    elif before or after:
        merged["comparison"] = after or before
    return merged


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--grids", type=int, nargs="+", default=[64], help="cubic grid sizes")
    parser.add_argument("--models", nargs="+", default=["SVF", "SVFFD"], choices=sorted(TRANSFORMATIONS))
    parser.add_argument("--metrics", nargs="+", default=["SSD", "LCC"], choices=["SSD", "LCC"])
    parser.add_argument("--variants", nargs="+", default=["baseline", "learnt"], choices=["baseline", "learnt"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=1, help="pairs per q_v batch")
    parser.add_argument("--cps", type=int, default=2, help="SVFFD control-point spacing (voxels, every axis)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed q_v iterations")
    parser.add_argument("--warmup", type=int, default=3, help="untimed q_v iterations first (>= 1)")
    parser.add_argument("--theta-repeats", type=int, default=10, help="timed theta/q_f steps (learnt metrics)")
    parser.add_argument("--theta-warmup", type=int, default=2)
    parser.add_argument("--whole-registration", type=int, default=0, metavar="N_ITERS",
                        help="also time the registration of one pair with N_ITERS q_v iterations (0: skip)")
    parser.add_argument("--processes", type=int, nargs="*", default=[],
                        help="process counts for the pairs/s scaling run (gloo on CPU, nccl on CUDA), e.g. 1 2")
    parser.add_argument("--scaling-iterations", type=int, default=32, help="q_v iterations per batch (scaling)")
    parser.add_argument("--scaling-batches", type=int, default=2, help="batches per process (scaling)")
    parser.add_argument("--scaling-config", nargs=4, default=["SVF", "SSD", "learnt", "64"],
                        metavar=("MODEL", "METRIC", "VARIANT", "GRID"))
    parser.add_argument("--no-flush-denormal", dest="flush_denormal", action="store_false",
                        help="keep subnormal floats in the q_v iterations (fit_q_v(flush_denormal=False))")
    parser.add_argument("--channels-last", action="store_true",
                        help="trainer.channels_last: the learnt metric's convolutions on NDHWC tensors")
    parser.add_argument("--compile", action="store_true",
                        help="trainer.q_v_compile: the q_v loss through torch.compile (q_v iterations only)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="trainer.q_v_cuda_graph: replay a captured q_v iteration (CUDA only)")
    parser.add_argument("--compare", metavar="REV",
                        help="also time git revision REV (e.g. main) in a temporary worktree, interleaved with the "
                             "working tree, and report the speed-ups")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration with --compare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    parser.add_argument("--append", action="store_true", help="merge into --out if it exists")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be >= 1")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(bench_configuration(json.loads(args.worker))))
        return None
    torch.set_num_threads(args.threads)
    run = {"command": " ".join(["python -m benchmarks.speed"] + (sys.argv[1:] if argv is None else list(argv))),
           "machine": machine_info(args.device), "code": code_state()}
    common = {"device": args.device, "batch": args.batch, "cps": args.cps, "threads": args.threads,
              "seed": args.seed, "flush_denormal": args.flush_denormal, "channels_last": args.channels_last,
              "compile": args.compile, "cuda_graph": args.cuda_graph}
    specs = [common | {"model": model, "metric": metric, "variant": variant, "grid": grid, "repeats": args.repeats,
                       "warmup": args.warmup, "theta_repeats": args.theta_repeats, "theta_warmup": args.theta_warmup,
                       "whole_registration": args.whole_registration}
             for grid in args.grids for model in args.models for metric in args.metrics for variant in args.variants]
    results, comparison = [], None
    if args.compare:
        with revision_worktree(args.compare) as revision_root:
            comparison = {"revision": args.compare, "commit": code_state(revision_root)["commit"],
                          "rounds": args.rounds, "rows": [], "revision_results": []}
            for spec in specs:
                print(f"{spec['model']} {spec['metric']} {spec['variant']} {spec['grid']}^3: {args.rounds} round(s) "
                      f"{args.compare} / working tree ...", file=sys.stderr, flush=True)
                row, before, after = compare_rounds(spec, revision_root, args.rounds)
                comparison["rows"].append(row)
                comparison["revision_results"] += before
                results += after
    else:
        for spec in specs:
            print(f"{spec['model']} {spec['metric']} {spec['variant']} {spec['grid']}^3 ...", file=sys.stderr,
                  flush=True)
            results.append(run_in_subprocess(spec))
    scaling = {"spec": None, "processes": []}
    if args.processes:
        model, metric, variant, grid = args.scaling_config
        for world in args.processes:
            spec = common | {"model": model, "metric": metric, "variant": variant, "grid": int(grid),
                             "threads": max(1, args.threads // world), "iterations": args.scaling_iterations,
                             "batches": args.scaling_batches, "warmup": args.warmup}
            print(f"scaling: {world} process(es), {spec['threads']} thread(s) each ...", file=sys.stderr, flush=True)
            scaling["processes"].append(run_scaling(world, spec))
            scaling["spec"] = {k: v for k, v in spec.items() if k != "threads"}
    run["machine"]["loadavg_end"] = list(os.getloadavg())
    report = {"runs": [run], "results": results, "scaling": scaling | {"voxels": voxel_scaling(results)}}
    if comparison is not None:
        report["comparison"] = comparison
    if args.out is not None:
        if args.append and args.out.is_file():
            report = merge(json.loads(args.out.read_text()), report)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"torch {run['machine']['torch']}, {run['machine']['cpu']}, {args.threads} thread(s), "
          f"load {run['machine']['loadavg_start']} -> {run['machine']['loadavg_end']}")
    print(format_table(report))
    return report


if __name__ == "__main__":
    main()
