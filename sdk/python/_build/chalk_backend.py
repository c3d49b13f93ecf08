"""A tiny PEP 517 build backend (standard library only) for chalkcompute.

It makes ``pip install ./sdk/python`` work offline on any Python >= 3.9
without setuptools or wheel: the package is pure Python, so a wheel is just
a zip of ``chalkcompute/`` plus its metadata.
"""

import base64
import hashlib
import os
import tarfile
import zipfile
from typing import Any, Dict, List, Optional

NAME = "chalkcompute"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version() -> str:
    with open(os.path.join(ROOT, NAME, "__init__.py"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    raise RuntimeError("no __version__ in %s/__init__.py" % NAME)


def _metadata() -> str:
    readme = ""
    p = os.path.join(ROOT, "README.md")
    if os.path.exists(p):
        with open(p, encoding="utf-8") as f:
            readme = f.read()
    return (
        "Metadata-Version: 2.1\n"
        "Name: %s\n"
        "Version: %s\n"
        "Summary: Python SDK for chalkcompute sandboxes (standard library only)\n"
        "License: Apache-2.0\n"
        "Requires-Python: >=3.9\n"
        "Classifier: Programming Language :: Python :: 3\n"
        "Classifier: Typing :: Typed\n"
        "Description-Content-Type: text/markdown\n"
        "\n%s" % (NAME, _version(), readme)
    )


def _package_files() -> List[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, NAME)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for fn in sorted(filenames):
            if fn.endswith(".py") or fn == "py.typed":
                out.append(os.path.relpath(os.path.join(dirpath, fn), ROOT).replace(os.sep, "/"))
    return out


def _dist_info() -> str:
    return "%s-%s.dist-info" % (NAME, _version())


def _wheel_text() -> str:
    return "Wheel-Version: 1.0\nGenerator: chalk_backend\nRoot-Is-Purelib: true\nTag: py3-none-any\n"


def _write_wheel(wheel_directory: str, files: Dict[str, bytes]) -> str:
    name = "%s-%s-py3-none-any.whl" % (NAME, _version())
    di = _dist_info()
    files = dict(files)
    files[di + "/METADATA"] = _metadata().encode("utf-8")
    files[di + "/WHEEL"] = _wheel_text().encode("utf-8")
    files[di + "/top_level.txt"] = (NAME + "\n").encode("utf-8")
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")
        record.append("%s,sha256=%s,%d" % (path, digest, len(data)))
    record.append(di + "/RECORD,,")
    files[di + "/RECORD"] = ("\n".join(record) + "\n").encode("utf-8")
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(files):
            info = zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, files[path])
    return name


def get_requires_for_build_wheel(config_settings: Optional[Dict[str, Any]] = None) -> List[str]:
    return []


def get_requires_for_build_sdist(config_settings: Optional[Dict[str, Any]] = None) -> List[str]:
    return []


def get_requires_for_build_editable(config_settings: Optional[Dict[str, Any]] = None) -> List[str]:
    return []


def prepare_metadata_for_build_wheel(metadata_directory: str, config_settings: Optional[Dict[str, Any]] = None) -> str:
    di = os.path.join(metadata_directory, _dist_info())
    os.makedirs(di, exist_ok=True)
    with open(os.path.join(di, "METADATA"), "w", encoding="utf-8") as f:
        f.write(_metadata())
    with open(os.path.join(di, "WHEEL"), "w", encoding="utf-8") as f:
        f.write(_wheel_text())
    return _dist_info()


prepare_metadata_for_build_editable = prepare_metadata_for_build_wheel


def build_wheel(wheel_directory: str, config_settings: Optional[Dict[str, Any]] = None, metadata_directory: Optional[str] = None) -> str:
    files = {}
    for rel in _package_files():
        with open(os.path.join(ROOT, rel), "rb") as f:
            files[rel] = f.read()
    return _write_wheel(wheel_directory, files)


def build_editable(wheel_directory: str, config_settings: Optional[Dict[str, Any]] = None, metadata_directory: Optional[str] = None) -> str:
    # A .pth file putting this source tree on sys.path.
    return _write_wheel(wheel_directory, {"_%s_editable.pth" % NAME: (ROOT + "\n").encode("utf-8")})


def build_sdist(sdist_directory: str, config_settings: Optional[Dict[str, Any]] = None) -> str:
    base = "%s-%s" % (NAME, _version())
    name = base + ".tar.gz"
    with tarfile.open(os.path.join(sdist_directory, name), "w:gz", format=tarfile.PAX_FORMAT) as t:
        for rel in ["pyproject.toml", "README.md", "_build/chalk_backend.py"] + _package_files():
            p = os.path.join(ROOT, rel)
            if os.path.exists(p):
                t.add(p, arcname=base + "/" + rel)
        pkg_info = _metadata().encode("utf-8")
        import io

        ti = tarfile.TarInfo(base + "/PKG-INFO")
        ti.size = len(pkg_info)
        t.addfile(ti, io.BytesIO(pkg_info))
    return name
