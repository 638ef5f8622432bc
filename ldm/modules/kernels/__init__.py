"""C++ CPU kernels for `ops.Custom(func_type="aot")`, compiled on first use with the system compiler.

A kernel is built once per source, compiler and CPU (`-march=native`) into the user's cache folder
(`$XDG_CACHE_HOME` or `~/.cache`, then `textual-inversion-ms/kernels`) and reused by later runs. It links
oneDNN from MindSpore's own `lib` folder (its sgemm; MindSpore has already loaded it). Without a
compiler, or if the build fails, `compiled_kernel` returns None after one warning and the caller keeps
its plain path: the kernels are an optimisation for the CPU, never a requirement.
"""
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

logger = logging.getLogger(__name__)

SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))
# -fno-math-errno / -fno-trapping-math let the exp and floor loops vectorize; no -ffast-math, whose
# reassociation would change sums and whose finite-math assumption would change max.
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-std=c++17",
         "-shared", "-fPIC", "-pthread"]
_built = {}


def _mindspore_lib():
    import mindspore
    return os.path.join(os.path.dirname(mindspore.__file__), "lib")


def _cpu_signature():
    # -march=native code is only valid on the CPU it was built for (a home folder may be shared)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))
    except OSError:
        return platform.processor()


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "textual-inversion-ms", "kernels")


def _build(name, compiler):
    source = os.path.join(SOURCE_DIR, name + ".cc")
    lib = _mindspore_lib()
    if not os.path.exists(os.path.join(lib, "libdnnl.so.3")):
        return None, f"MindSpore's {lib} has no libdnnl.so.3"
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    with open(source, "rb") as f:
        key = hashlib.sha256(f.read() + " ".join(FLAGS).encode() + version.encode() + lib.encode()
                             + _cpu_signature().encode()).hexdigest()[:16]
    target = os.path.join(cache_dir(), f"{name}-{key}.so")
    if os.path.exists(target):
        return target, None
    os.makedirs(cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=cache_dir())
    os.close(fd)
    cmd = [compiler, *FLAGS, "-o", tmp, source, f"-L{lib}", "-l:libdnnl.so.3", f"-Wl,-rpath,{lib}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        os.remove(tmp)
        return None, f"{' '.join(cmd)} failed: {result.stderr.strip().splitlines()[-1:]}"
    os.replace(tmp, target)  # atomic: a concurrent run sees the whole library or none
    return target, None


def compiled_kernel(name):
    """Path of the shared library built from `<name>.cc`, or None (warned once) when it cannot be built."""
    if name not in _built:
        compiler = os.environ.get("CXX") or "g++"
        path, why = None, None
        if platform.system() != "Linux" or shutil.which(compiler) is None:
            why = f"no C++ compiler ({compiler}) on a Linux machine"
        else:
            try:
                path, why = _build(name, compiler)
            except (OSError, subprocess.CalledProcessError) as err:
                why = str(err)
        if why:
            logger.warning("CPU kernel %s not built (%s); using the slower plain path", name, why)
        _built[name] = path
    return _built[name]
