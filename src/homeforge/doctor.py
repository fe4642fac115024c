"""`homeforge doctor`: what this machine is and can do, each with a fix where one applies."""

from __future__ import annotations

import os
import platform
import shutil
from importlib import metadata


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def checks(path: str = ".") -> list[tuple[str, str, str, str]]:
    """Rows of (check, value, status ok|warn|fail, fix)."""
    import psutil
    import torch

    from homeforge.security import egress

    rows = []
    flags = _cpu_flags()
    rows.append(("cpu", _cpu_model(), "ok", ""))
    cores = os.cpu_count() or 1
    rows.append(("cores", f"{cores} logical, torch uses {torch.get_num_threads()} threads", "ok" if cores >= 2 else "warn",
                 "" if cores >= 2 else "training will be slow on one core"))
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    rows.append(("cpu bf16", "native" if native_bf16 else "not native (fp32 is used on the CPU)", "ok", ""))
    mem = psutil.virtual_memory()
    rows.append(("memory", f"{mem.total / 2**30:.1f} GiB total, {mem.available / 2**30:.1f} GiB available",
                 "ok" if mem.available > 4 * 2**30 else "warn",
                 "" if mem.available > 4 * 2**30 else "close other programs or use a smaller preset / micro-batch"))
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        rows.append(("gpu", f"{torch.cuda.device_count()}x {names}, CUDA {torch.version.cuda}", "ok", ""))
        rows.append(("gpu bf16", str(torch.cuda.is_bf16_supported()), "ok", ""))
    else:
        rows.append(("gpu", "none (CUDA not available)", "ok",
                     "training runs on the CPU; for a GPU install a CUDA build of torch" if torch.version.cuda is None else ""))
    dist = torch.distributed.is_available()
    nccl = dist and torch.distributed.is_nccl_available()
    gloo = dist and torch.distributed.is_gloo_available()
    rows.append(("distributed", f"gloo={'yes' if gloo else 'no'} nccl={'yes' if nccl else 'no'}",
                 "ok" if gloo else "warn", "" if gloo else "this torch build has no gloo backend; multi-process CPU training is off"))
    rows.append(_int8_block_row(flags))
    for dist_name in ("torch", "transformers", "tokenizers", "peft", "onnxruntime", "fastapi", "cryptography", "opacus"):
        v = _version(dist_name)
        required = dist_name in ("torch", "transformers", "tokenizers")
        rows.append((dist_name, v or "not installed", "ok" if v else ("fail" if required else "warn"),
                     "" if v else f"pip install '{'homeforge' if required else 'homeforge[all]'}'"))
    usage = shutil.disk_usage(path)
    free_gb = usage.free / 2**30
    rows.append(("disk free", f"{free_gb:.1f} GiB at {os.path.abspath(path)}", "ok" if free_gb > 5 else "warn",
                 "" if free_gb > 5 else "free space: checkpoints of a 124M model take ~1.5 GB each"))
    guard = egress.is_installed()
    allowed = f" (also allowed: {', '.join(egress.allowed_hosts())})" if egress.allowed_hosts() else ""
    rows.append(("network guard", ("on: non-loopback connections and name lookups are refused before the system "
                                    "call (audit hook on every Python socket) and audited" + allowed) if guard else "off",
                 "ok" if guard else "warn", "" if guard else "unset HOMEFORGE_ALLOW_NETWORK"))
    rows.append(("network guard: child processes",
                 "Python children that import homeforge (torchrun ranks, workers) are guarded; other programs "
                 "(compilers, llama.cpp, curl, a Python process that does not import homeforge) and native code that "
                 "opens sockets itself are not stopped by it", "ok" if guard else "warn",
                 "for a kernel-level boundary run homeforge without a network: `unshare -rn homeforge ...`, a "
                 "container with --network none, or a firewall"))
    rows.extend(_leftover_rows(path))
    rows.extend(_security_rows())
    offline = all(os.environ.get(k) == v for k, v in egress.OFFLINE_ENV.items())
    rows.append(("hub offline switches", "set" if offline else "not all set", "ok" if offline else "warn", ""))
    return rows


def _int8_block_row(flags: set[str]) -> tuple[str, str, str, str]:
    """`compress -m int8-block` runs on homeforge's AVX-512 VNNI kernel, compiled on first use."""
    need = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}
    if not need <= flags:
        return ("int8-block kernel", "no AVX-512 VNNI on this CPU: int8-block models run the slower torch path",
                "ok", "use int8-dynamic for CPU speed here")
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    ninja = shutil.which("ninja") or _version("ninja")
    if compiler and ninja:
        return ("int8-block kernel", f"AVX-512 VNNI; compiler {compiler}; built on first use (~40 s)", "ok", "")
    return ("int8-block kernel", "AVX-512 VNNI, but " + ("no C++ compiler" if not compiler else "no ninja"), "warn",
            "install g++ (e.g. apt-get install g++)" if not compiler else "pip install ninja")


def _leftover_rows(path: str) -> list[tuple[str, str, str, str]]:
    """Temp folders of killed homeforge processes: removed at this command's start (scratch.clean_leftovers),
    plus any not registered (an older homeforge) under ``path``."""
    from pathlib import Path

    from homeforge import artifacts, scratch

    removed = scratch.removed_this_run() + [str(p) for p in artifacts.clean_stale_temps(Path(path).absolute())]
    if removed:
        shown = ", ".join(removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
        return [("crash leftovers", f"removed {len(removed)} temp folder(s) of killed homeforge processes: {shown}",
                 "warn", "a stage was killed (kill -9, power loss); its partial output (and any plaintext) is now gone")]
    return [("crash leftovers", "none (temp folders of killed processes are removed at every homeforge start)", "ok", "")]


def _security_rows() -> list[tuple[str, str, str, str]]:
    """Data key and audit log (security/keys.py, security/audit.py)."""
    from homeforge.errors import HomeforgeError
    from homeforge.security import audit, keys

    rows = []
    try:
        k = keys.load_key(required=False)
        rows.append(("data key", f"{k.key_id} from {k.source}" if k else "none (artifacts are written unencrypted)",
                     "ok", "" if k else "for encryption at rest: homeforge keys init, then homeforge --encrypt ..."))
    except HomeforgeError as exc:
        rows.append(("data key", exc.what, "fail", exc.fix or ""))
    try:
        audit.default_key()
    except HomeforgeError as exc:
        rows.append(("audit key", exc.what, "fail", exc.fix or ""))
    log = audit.default_path()
    signed = audit.audit_key_path().is_file()
    rows.append(("audit log", f"{log} ({'HMAC-signed' if signed else 'hash-chained, unsigned'}, "
                 f"retention {audit.retention_days()} days)", "ok",
                 "" if signed else "homeforge keys init also creates the audit signing key"))
    return rows
