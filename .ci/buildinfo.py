"""What a build of sslops._C was made from, so a build is redone only when that changed.

    python .ci/buildinfo.py fingerprint                 # JSON: sources hash, torch, build switches
    python .ci/buildinfo.py stamp-matches STAMP         # exit 0 when STAMP (a JSON file) matches this checkout + torch
    python .ci/buildinfo.py write-stamp STAMP [KEY=VALUE ...]
    python .ci/buildinfo.py prebuilt-matches DIR        # exit 0 when DIR/build.json was built for this checkout + torch
    python .ci/buildinfo.py abi-check SO                # the library needs only Python's stable ABI, no libtorch_python

Used by .ci/install (skip the rebuild when nothing changed; take a carried prebuilt
extension) and .ci/build-gpu-ext (record what the prebuilt extension was built for). Run
with the Python whose torch the build is for. The fingerprint covers every file under
csrc/, setup.py, torch's version, CUDA version and git commit, and the environment
switches setup.py reads; not the Python version (the extension uses the limited API).
"""

import hashlib
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWITCHES = ("SSLOPS_SKIP_EXT", "SSLOPS_BUILD_CUDA", "SSLOPS_DEBUG", "SSLOPS_NO_OPENMP", "TORCH_CUDA_ARCH_LIST")


def sources_hash(root=ROOT):
    """sha256 over the path and bytes of every file under csrc/ and of setup.py."""
    paths = []
    for base, dirs, files in os.walk(os.path.join(root, "csrc")):
        dirs.sort()
        paths += [os.path.join(base, f) for f in files if not f.endswith((".o", ".pyc"))]
    paths = sorted(paths) + [os.path.join(root, "setup.py")]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
        with open(path, "rb") as fh:
            digest.update(fh.read())
        digest.update(b"\0")
    return digest.hexdigest()


def torch_info():
    """torch's version, CUDA version and git commit, read from torch/version.py without importing
    torch (an import costs seconds, more on a loaded machine)."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return {"torch": None, "torch_cuda": None, "torch_git": None}
    values = {}
    with open(os.path.join(list(spec.submodule_search_locations)[0], "version.py")) as fh:
        exec(compile(fh.read(), "torch/version.py", "exec"), values)  # plain assignments only
    return {"torch": values.get("__version__"), "torch_cuda": values.get("cuda"), "torch_git": values.get("git_version")}


def fingerprint(root=ROOT, env=None):
    """Everything a build's result depends on, as a flat dict."""
    env = os.environ if env is None else env
    info = {"sources": sources_hash(root)}
    info.update(torch_info())
    info["switches"] = {name: env.get(name, "") for name in SWITCHES}
    return info


def matches(recorded, current, keys=None):
    """True when ``recorded`` agrees with ``current`` on ``keys`` (default: every key of ``current``)."""
    keys = list(current) if keys is None else keys
    return all(recorded.get(k) == current.get(k) for k in keys)


def _load(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


# What a carried prebuilt extension must agree on: built from these sources, for this torch
# release (version with its local tag, e.g. 2.11.0+cu130, and CUDA version). torch's git commit
# is recorded and reported but not required: PyPI's and PyTorch's own index serve the same
# release build, and a library that does not load is caught by .ci/install's import check.
# (Switches are not compared: the prebuilt is a CUDA build made on purpose by .ci/build-gpu-ext.)
PREBUILT_KEYS = ("sources", "torch", "torch_cuda")


def prebuilt_mismatch(directory, root=ROOT):
    """None when ``directory`` holds an extension built for this checkout and torch, else why not."""
    recorded = _load(os.path.join(directory, "build.json"))
    if recorded is None:
        return f"no readable {directory}/build.json"
    so = os.path.join(directory, recorded.get("file", "_C.abi3.so"))
    if not os.path.isfile(so):
        return f"{so} is missing"
    current = fingerprint(root)
    diffs = [f"{k}: built for {recorded.get(k)!r}, here {current.get(k)!r}" for k in PREBUILT_KEYS if recorded.get(k) != current.get(k)]
    if not diffs and recorded.get("torch_git") != current.get("torch_git"):
        print(f"note: torch {current['torch']} here is commit {current.get('torch_git')}, the prebuilt's {recorded.get('torch_git')}",
              file=sys.stderr)
    return "; ".join(diffs) or None


# ----------------------------------------------------------------------------- ABI check

def _undefined_symbols(so):
    out = subprocess.run(["nm", "-D", "--undefined-only", so], capture_output=True, text=True, check=True).stdout
    return sorted({line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()})


def _needed_libraries(so):
    out = subprocess.run(["readelf", "-d", so], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


# Underscore names that are nevertheless part of the stable ABI (used by its macros).
STABLE_PRIVATE = {"_Py_Dealloc", "_Py_NoneStruct", "_Py_TrueStruct", "_Py_FalseStruct", "_Py_IncRef", "_Py_DecRef"}


def abi_problems(so):
    """Why ``so`` would not load on another CPython version (empty when it would).

    CPython installs no list of its stable ABI, so this checks what can be checked from
    the library alone: no private ``_Py*`` symbol (besides the few the limited API's macros
    use), no pybind11, and no Python-version-specific library (libpython3.X,
    libtorch_python). tests/test_packaging.py also loads a build into another CPython.
    """
    problems = []
    undefined = _undefined_symbols(so)
    python_symbols = [s for s in undefined if re.match(r"_?Py", s)]
    private = [s for s in python_symbols if s.startswith("_") and s not in STABLE_PRIVATE]
    if private:
        problems.append(f"private (version-specific) Python symbols: {private}")
    needed = _needed_libraries(so)
    bad = [lib for lib in needed if lib.startswith(("libpython", "libtorch_python"))]
    if bad:
        problems.append(f"links Python-version-specific libraries: {bad}")
    if any("pybind11" in s for s in undefined):
        problems.append("uses pybind11 symbols")
    return problems, python_symbols, needed


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "fingerprint":
        print(json.dumps(fingerprint(), indent=1, sort_keys=True))
        return 0
    if cmd == "stamp-matches":
        recorded = _load(args[0])
        return 0 if recorded is not None and matches(recorded, fingerprint()) else 1
    if cmd == "write-stamp":
        info = fingerprint()
        for pair in args[1:]:
            key, _, value = pair.partition("=")
            info[key] = value
        with open(args[0], "w") as fh:
            json.dump(info, fh, indent=1, sort_keys=True)
            fh.write("\n")
        return 0
    if cmd == "prebuilt-matches":
        why = prebuilt_mismatch(args[0])
        if why:
            print(why)
            return 1
        return 0
    if cmd == "abi-check":
        problems, python_symbols, needed = abi_problems(args[0])
        print(f"Python symbols needed: {' '.join(python_symbols) or '(none)'}")
        print(f"libraries needed: {' '.join(needed)}")
        for p in problems:
            print("PROBLEM:", p)
        print("stable ABI only: " + ("no" if problems else "yes"))
        return 1 if problems else 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
