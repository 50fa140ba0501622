"""Fault-injection points used by the kill/restart and preemption tests.

Set MAE3D_FAULT to a comma-separated list of point names (e.g. "step:1:2,save_mid:checkpoint-last.pth") and the
process kills itself with SIGKILL the first time it reaches one of them: a real, unannounced death, at a
reproducible place. A point may carry a signal instead, "SIGNAL@point": "term@step:1:2" sends SIGTERM to this
process, "usr1@..." SIGUSR1, "int@..." SIGINT (Ctrl-C), "term-parent@..." SIGTERM to the parent (the torchrun
agent, which forwards it to every worker); "slow@..." instead prints `fault: slow at <point>` to stderr and
waits 3 s there, a window in which a test can send signals (e.g. Ctrl-C during a checkpoint write). MAE3D_FAULT_RANK limits it to one torchrun rank; MAE3D_FAULT_ONCE
names a marker file so the fault fires only once across restarts. Unset (the normal case) this costs one
environment lookup per call.
"""
import os
import signal
import sys
import time

SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "usr1": signal.SIGUSR1, "int": signal.SIGINT,
           "term-parent": signal.SIGTERM}


def fault_point(name: str) -> None:
    spec = os.environ.get("MAE3D_FAULT")
    if not spec:
        return
    kinds = [k.partition("@")[0] if "@" in k else "kill" for k in spec.split(",")
             if (k.partition("@")[2] if "@" in k else k) == name]
    if not kinds:
        return
    rank = os.environ.get("MAE3D_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    once = os.environ.get("MAE3D_FAULT_ONCE")
    if once:
        if os.path.exists(once):
            return
        open(once, "w").close()
    kind = kinds[0]
    if kind == "slow":
        print(f"fault: slow at {name}", file=sys.stderr, flush=True)
        time.sleep(3)
        return
    os.kill(os.getppid() if kind == "term-parent" else os.getpid(), SIGNALS[kind])
