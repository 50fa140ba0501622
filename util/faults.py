"""Fault-injection points used by the kill/restart tests.

Set MAE3D_FAULT to a comma-separated list of point names (e.g. "step:1:2,save_mid:checkpoint-last.pth") and the
process kills itself with SIGKILL the first time it reaches one of them: a real, unannounced death, at a
reproducible place. MAE3D_FAULT_RANK limits it to one torchrun rank; MAE3D_FAULT_ONCE names a marker file so the
fault fires only once across restarts. Unset (the normal case) this costs one environment lookup per call.
"""
import os
import signal


def fault_point(name: str) -> None:
    spec = os.environ.get("MAE3D_FAULT")
    if not spec or name not in spec.split(","):
        return
    rank = os.environ.get("MAE3D_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    once = os.environ.get("MAE3D_FAULT_ONCE")
    if once:
        if os.path.exists(once):
            return
        open(once, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)
