"""Where a train_dino run under torchrun spends its teardown: per-rank timestamps at the end of
training, rank 0's export, the barrier and destroy_process_group, and the threads alive then; a
rank that hangs dumps every thread's Python stack (faulthandler) and exits.

  torchrun --standalone --nproc_per_node=2 bench/teardown_probe.py CODE_DIR [train_dino flags]

CODE_DIR holds the train_dino.py and utils.py to probe. $PROBE_DELAY: seconds rank 0 sleeps
before its final export (a slow disk or a large model); $PROBE_HANG_S: the faulthandler limit.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import sys
import threading
import time

sys.path.insert(0, os.path.abspath(sys.argv.pop(1)))
import torch.distributed as dist  # noqa: E402

import train_dino  # noqa: E402
import utils  # noqa: E402

RANK, T0 = int(os.environ.get("RANK", 0)), time.time()


def log(msg: str) -> None:
    print(f"\n[probe rank {RANK} t={time.time() - T0:7.2f}s] {msg}", flush=True)  # own line


def traced(name: str, fn, before=None):
    def wrapper(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        log(f"{name} enter; threads {sorted(t.name for t in threading.enumerate())}")
        out = fn(*args, **kwargs)
        log(f"{name} returned")
        return out

    return wrapper


def slow_export(V, out_dir, config, name="encoder"):
    if name == "encoder":
        time.sleep(float(os.environ.get("PROBE_DELAY", 0)))


faulthandler.dump_traceback_later(float(os.environ.get("PROBE_HANG_S", 240)), exit=True)
utils.export_encoder = traced("export_encoder", utils.export_encoder, slow_export)
dist.barrier = traced("barrier", dist.barrier)
dist.destroy_process_group = traced("destroy_process_group", dist.destroy_process_group)
atexit.register(log, "interpreter exit (last atexit handler)")
log("start")
train_dino.main(sys.argv[1:])
log("main returned")
