"""Where the time of a q_v iteration goes: torch.profiler over a few iterations of the production loop.

    python -m benchmarks.profile_q_v --model SVF --metric SSD --variant learnt --grid 64 --threads 1

Prints the operators sorted by self time (CPU, or CUDA with ``--device cuda``); ``--trace FILE`` also writes a
Chrome trace.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.speed import TRANSFORMATIONS, build, initial_q_v, make_config, make_images
from trainer.q_v_inference import fit_q_v


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SVF", choices=sorted(TRANSFORMATIONS))
    parser.add_argument("--metric", default="SSD", choices=["SSD", "LCC"])
    parser.add_argument("--variant", default="learnt", choices=["baseline", "learnt"])
    parser.add_argument("--grid", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cps", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--iterations", type=int, default=5, help="profiled q_v iterations (after 2 warm-up ones)")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--trace", help="write a Chrome trace here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = make_config(args.model, args.metric, args.variant, args.grid, args.batch, args.cps,
                         args.channels_last)
    energy, _ = build(config, device)
    fixed, moving, mask = make_images(config.data_loader.args.dims, args.batch, device, 0)
    lr = config.optimizer_q_v.args.lr
    fit_q_v(energy, initial_q_v(config, energy, args.batch, device), fixed, moving, mask, 2, lr)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    q_v = initial_q_v(config, energy, args.batch, device)
    with profile(activities=activities, record_shapes=True) as prof:
        fit_q_v(energy, q_v, fixed, moving, mask, args.iterations, lr)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
