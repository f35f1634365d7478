"""Reading checkpoints never runs code from them. Each hostile file below writes a marker file when loaded the
usual way (`torch.load(weights_only=False)`, checked first, so every case is a live exploit); reading or
converting it here must leave no marker, and either succeed with the payload as an inert placeholder or fail
with a clear error. The numpy files in `CRASHES` instead crash (SIGSEGV) any reader that lets numpy build them;
they are only ever read in a fresh interpreter."""

import collections
import contextlib
import copyreg
import importlib
import io
import json
import os
import pickle
import shlex
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation
from offseg_hf.convert.official import load_official_checkpoint, read_official_checkpoint, to_official_state_dict
from offseg_hf.models import safe_pickle
from offseg_hf.models.safe_pickle import Placeholder

from .test_convert import fake_mmengine, runner_checkpoint

VARIANT = "segformer-b0-offset"
EVIL_MODULE = "offseg_test_evil_module"  # importing it writes the marker
EXTENSION_CODE = 240  # a copyreg extension code the tests register for ("posix", "system")


@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(OffSegConfig.from_variant(VARIANT, num_labels=3))
    return to_official_state_dict(model.state_dict(), VARIANT)


class Call:
    """Pickles as `func(*args)` (then BUILD with `state`, if given), like a hostile object's `__reduce__`; callable
    so that it can itself be the function of another call (a chain)."""

    def __init__(self, func, *args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)

    def __call__(self, *args):
        raise AssertionError("only pickled")


def _touch(marker) -> str:
    return f"touch {shlex.quote(str(marker))}"


def _write(marker) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def _text(value: str) -> bytes:
    return b"V" + value.encode("raw_unicode_escape") + b"\n"


def _torch_zip(data_pkl: bytes) -> bytes:
    """A torch zip checkpoint whose pickle is `data_pkl`, written opcode by opcode; its one storage record, key
    "0", holds 4 float32 zeros."""
    saved = io.BytesIO()
    torch.save(torch.zeros(4), saved)
    source, result = zipfile.ZipFile(saved), io.BytesIO()
    with zipfile.ZipFile(result, "w", zipfile.ZIP_STORED) as archive:
        for info in source.infolist():
            archive.writestr(info.filename, data_pkl if info.filename.endswith("/data.pkl") else source.read(info))
    return result.getvalue()


@dataclass
class Payload:
    build: object  # (marker) -> an object to pickle inside a real checkpoint's meta, or the raw bytes of a file
    placeholder: tuple[str, str] | None = None  # what meta["payload"] reads as, when reading succeeds
    refused: str | None = None  # else the error message
    extension: bool = False  # needs the copyreg extension registered to be live


def _rebuild_tensor_globals_exec(marker):
    """exec reached by walking from an allowed function: getattr(f, "__globals__").get("__builtins__").get("exec")."""
    module_globals = Call(getattr, torch._utils._rebuild_tensor_v2, "__globals__")
    builtins_dict = Call(Call(getattr, module_globals, "get"), "__builtins__")
    return Call(Call(Call(getattr, builtins_dict, "get"), "exec"), _write(marker))


PAYLOADS = {
    "os.system hand-written in a torch zip": Payload(
        lambda m: _torch_zip(b"(Vpayload\ncos\nsystem\n(" + _text(_touch(m)) + b"tRd."),
        refused="not tensors",
    ),
    "posix.system": Payload(lambda m: Call(os.system, _touch(m)), placeholder=("posix", "system")),
    "builtins.eval": Payload(lambda m: Call(eval, _write(m)), placeholder=("builtins", "eval")),
    "builtins.exec": Payload(lambda m: Call(exec, _write(m)), placeholder=("builtins", "exec")),
    "subprocess.Popen": Payload(
        lambda m: Call(subprocess.Popen, ["touch", str(m)]), placeholder=("subprocess", "Popen")
    ),
    "getattr(__import__('os'), 'system')": Payload(
        lambda m: Call(Call(getattr, Call(__import__, "os"), "system"), _touch(m)), refused="Refused getattr"
    ),
    "getattr chain from an allowed function to exec": Payload(_rebuild_tensor_globals_exec, refused="Refused getattr"),
    "importlib.import_module": Payload(
        lambda m: Call(importlib.import_module, EVIL_MODULE), placeholder=("importlib", "import_module")
    ),
    "copyreg._reconstructor(Popen, Popen, args)": Payload(
        lambda m: Call(copyreg._reconstructor, subprocess.Popen, subprocess.Popen, ["touch", str(m)]),
        placeholder=("subprocess", "Popen"),
    ),
    "BUILD sets __setstate__, the next BUILD calls it": Payload(
        lambda m: _torch_zip(
            b"ctypes\nSimpleNamespace\n)R(N}V__setstate__\ncos\nsystem\nstb" + _text(_touch(m)) + b"b."
        ),
        refused="Not a state dict",
    ),
    "copyreg extension code": Payload(
        lambda m: _torch_zip(b"\x80\x02\x82" + bytes([EXTENSION_CODE]) + b"(" + _text(_touch(m)) + b"tR."),
        refused="Refused extension code",
        extension=True,
    ),
    "legacy file that is one raw pickle": Payload(
        lambda m: b"cposix\nsystem\n(" + _text(_touch(m)) + b"tR.", refused="Invalid magic number"
    ),
    "posix.system in a legacy-format checkpoint": Payload(
        lambda m: ("legacy", Call(os.system, _touch(m))), placeholder=("posix", "system")
    ),
}


_MULTIARRAY = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
POINTER = struct.pack("<Q", 0x4141414141414140)  # read as a PyObject*, an address that is mapped nowhere


def _object_dtype_without_flags():
    """dtype("O8") whose BUILD state clears its object flags (the last item): numpy then reads raw bytes from the
    file as object pointers, and dereferences them."""
    return Call(np.dtype, "O8", False, True, state=(3, "|", None, None, None, -1, -1, 0))


def _pointer_array():
    pointer_state = (1, (1,), _object_dtype_without_flags(), False, POINTER)
    return Call(_MULTIARRAY._reconstruct, np.ndarray, (0,), b"b", state=pointer_state)


# The reviewer's files: through numpy's allowlisted pieces, in either reader, they segfaulted the process. They
# crash rather than write a marker, so they are never read in the test process itself.
CRASHES = {
    "frozenset of an array of pointers from the file": Payload(
        lambda m: Call(frozenset, _pointer_array()), refused="Refused frozenset"
    ),
    "numpy scalar of a pointer from the file": Payload(
        lambda m: Call(_MULTIARRAY.scalar, _object_dtype_without_flags(), POINTER),
        placeholder=(_MULTIARRAY.__name__, "scalar"),
    ),
}


@contextlib.contextmanager
def _extension(active: bool):
    if active:
        copyreg.add_extension("posix", "system", EXTENSION_CODE)
    try:
        yield
    finally:
        if active:
            copyreg.remove_extension("posix", "system", EXTENSION_CODE)


@pytest.fixture
def hostile(request, official, tmp_path, monkeypatch):
    """(payload, path of the hostile file, marker path); EVIL_MODULE importable from sys.path."""
    payload = {**PAYLOADS, **CRASHES}[request.param]
    marker = tmp_path / "pwned"
    (tmp_path / f"{EVIL_MODULE}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    built = payload.build(marker)
    path = tmp_path / "bad.pth"
    if isinstance(built, bytes):
        path.write_bytes(built)
    else:
        legacy = isinstance(built, tuple) and built[0] == "legacy"
        checkpoint = {"state_dict": official, "meta": {"payload": built[1] if legacy else built}}
        torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    yield payload, path, marker
    sys.modules.pop(EVIL_MODULE, None)


def _wait_for(marker, seconds=10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not marker.exists() and time.monotonic() < deadline:  # Popen runs `touch` asynchronously
        time.sleep(0.05)
    return marker.exists()


@pytest.mark.parametrize("hostile", sorted(PAYLOADS), indirect=True)
def test_each_hostile_file_runs_its_payload_under_a_plain_load(hostile):
    payload, path, marker = hostile
    with _extension(payload.extension), contextlib.suppress(Exception):
        torch.load(path, weights_only=False)
    assert _wait_for(marker)


@pytest.mark.parametrize("hostile", sorted(PAYLOADS), indirect=True)
def test_reading_a_hostile_file_runs_nothing(hostile, official):
    payload, path, marker = hostile
    with _extension(payload.extension):
        if payload.refused:
            with pytest.raises((pickle.UnpicklingError, ValueError, RuntimeError), match=payload.refused):
                read_official_checkpoint(str(path))
        else:
            state_dict, _ = read_official_checkpoint(str(path))
            assert state_dict.keys() == official.keys()
            meta = torch.load(path, map_location="cpu", weights_only=False, pickle_module=safe_pickle)["meta"]
            kind = type(meta["payload"])
            assert isinstance(meta["payload"], Placeholder)
            assert (kind.__module__, kind.__qualname__) == payload.placeholder
    assert not _wait_for(marker, seconds=0.2)
    assert EVIL_MODULE not in sys.modules


# The command line reads as `read_official_checkpoint` does (tested above for every payload): a few kinds suffice.
CLI_CASES = ["posix.system", "posix.system in a legacy-format checkpoint", "os.system hand-written in a torch zip"]


@pytest.mark.slow
@pytest.mark.parametrize("hostile", CLI_CASES + sorted(CRASHES), indirect=True)
def test_converting_a_hostile_file_from_the_command_line_runs_nothing(hostile, tmp_path):
    payload, path, marker = hostile
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "offseg_hf.convert", "--checkpoint", str(path), "--variant", VARIANT]
    result = subprocess.run(
        [*command, "--output_dir", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode in (0, 1), result.stderr[-2000:]  # never killed by a signal
    assert (result.returncode != 0) == bool(payload.refused), result.stderr[-2000:]
    if payload.refused:
        assert payload.refused in result.stderr
    else:
        assert (tmp_path / "out" / "config.json").exists()
    assert not _wait_for(marker, seconds=0.2)


def _crash_files(tmp_path, official) -> dict[str, str]:
    """The reviewer's three reproducers: a bare pickle for `safe_pickle`, two checkpoints for the converter."""
    array, scalar = (CRASHES[name].build(None) for name in sorted(CRASHES))
    paths = {name: str(tmp_path / name) for name in ("array.pkl", "array.pth", "scalar.pth")}
    with open(paths["array.pkl"], "wb") as handle:
        pickle.dump({"state_dict": {}, "meta": array}, handle, protocol=2)
    torch.save({"state_dict": official, "meta": array}, paths["array.pth"])
    torch.save({"state_dict": official, "meta": scalar}, paths["scalar.pth"])
    return paths


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_numpy_crash_files_crash_readers_that_let_numpy_build_them(tmp_path, official):
    paths = _crash_files(tmp_path, official)
    plain = _run_python("import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))", paths["array.pkl"])
    # torch's own restricted reader, with numpy's pieces registered as the converter used to register them.
    numpy_registered = (
        "import sys, numpy as np, torch; m = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray\n"
        "with torch.serialization.safe_globals([np.dtype, type(np.dtype('O')), m.scalar]):\n"
        "    torch.load(sys.argv[1], weights_only=True)"
    )
    restricted = _run_python(numpy_registered, paths["scalar.pth"])
    assert plain.returncode < 0 and restricted.returncode < 0, (plain.stderr[-1000:], restricted.stderr[-1000:])


READ_IN_A_FRESH_INTERPRETER = """
import json, sys, torch
from offseg_hf.models import safe_pickle
from offseg_hf.convert.official import read_official_checkpoint

numpy_calls = []


def watch(frame, event, func):  # every C function called from Python code (both readers are pure Python)
    owner = getattr(getattr(func, "__self__", None), "__name__", "")
    if event == "c_call" and "numpy" in f"{getattr(func, '__module__', '')} {owner}":
        numpy_calls.append(repr(func))


for path in sys.argv[1:]:
    sys.setprofile(watch)
    try:
        if path.endswith(".pkl"):
            outcome = repr(safe_pickle.load(open(path, "rb")))
        else:
            state_dict, _ = read_official_checkpoint(path)
            meta = torch.load(path, map_location="cpu", weights_only=False, pickle_module=safe_pickle)["meta"]
            dtype, raw = meta.args
            outcome = [sorted(state_dict)[:1], repr(meta), repr(dtype), dtype.args, list(dtype.state), raw.hex()]
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"
    sys.setprofile(None)
    print(json.dumps(outcome))
print(json.dumps(numpy_calls))
"""


@pytest.mark.slow
def test_the_numpy_crash_files_read_as_inert_placeholders(tmp_path, official):
    paths = _crash_files(tmp_path, official)
    result = _run_python(READ_IN_A_FRESH_INTERPRETER, paths["array.pkl"], paths["array.pth"], paths["scalar.pth"])
    assert result.returncode == 0, result.stderr[-2000:]
    *outcomes, numpy_calls = [json.loads(line) for line in result.stdout.splitlines()[-4:]]
    refused = "UnpicklingError: Refused frozenset(...): TypeError: '_reconstruct' object is not iterable"
    assert outcomes[:2] == [refused, refused]  # the array is a placeholder, not an array
    dtype_state = [3, "|", None, None, None, -1, -1, 0]
    scalar = f"<placeholder {_MULTIARRAY.__name__}.scalar>"
    assert outcomes[2] == [
        [min(official)],
        scalar,
        "<placeholder numpy.dtype>",
        ["O8", False, True],
        dtype_state,
        POINTER.hex(),
    ]
    assert numpy_calls == []  # nothing in numpy was called


def test_globals_are_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "offseg_test_import_marker.py").write_text(f"open({str(marker)!r}, 'w').close()\nvalue = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = safe_pickle.loads(b"coffseg_test_import_marker\nvalue\n.")
    assert issubclass(loaded, Placeholder) and loaded.__module__ == "offseg_test_import_marker"
    assert "offseg_test_import_marker" not in sys.modules and not marker.exists()
    assert importlib.import_module("offseg_test_import_marker").value == 1 and marker.exists()  # it was importable
    sys.modules.pop("offseg_test_import_marker")


def test_placeholders_keep_what_the_pickle_gave_them():
    call = safe_pickle.loads(b"cos\nsystem\n(Vecho hi\ntR.")
    assert isinstance(call, Placeholder) and call.args == ("echo hi",) and call.kwargs == {}
    assert type(call).__module__ == "os" and type(call).__qualname__ == "system"
    # What protocol 2 writes for a method reference such as mmengine's HistoryBuffer.min.
    method = safe_pickle.loads(b"cbuiltins\ngetattr\n(cmmengine.logging\nHistoryBuffer\nVmin\ntR.")
    assert issubclass(method, Placeholder) and method.__qualname__ == "HistoryBuffer.min"
    assert method.__module__ == "mmengine.logging"
    # A dict subclass (NEWOBJ, then SETITEMS) and a list subclass (APPENDS), then BUILD.
    config = safe_pickle.loads(b"\x80\x02cmmengine\nConfigDict\n)\x81(Va\nK\x01u}Vx\nK\x02sb.")
    assert config.items == {"a": 1} and config.state == {"x": 2}
    assert safe_pickle.loads(b"\x80\x02cpkg\nItems\n)\x81(K\x01K\x02e.").values == [1, 2]
    first, second = safe_pickle.loads(b"(cpkg\nA\ncpkg\nA\nt.")
    assert first is second  # one class per name, as with real globals
    assert safe_pickle.loads(b"(cpkg\nA\nK\x01o.").args == (1,)  # OBJ
    assert safe_pickle.loads(b"(K\x02ipkg\nB\n.").args == (2,)  # INST


REFUSED = {
    "getattr on an allowed function": (
        b"cbuiltins\ngetattr\n(ctorch._utils\n_rebuild_tensor_v2\nV__globals__\ntR.",
        "getattr",
    ),
    "getattr on a placeholder instance": (b"cbuiltins\ngetattr\n(cos\nsystem\n)RVx\ntR.", "getattr"),
    "getattr with a default": (b"cbuiltins\ngetattr\n(cos\nsystem\nVx\nNtR.", "getattr"),
    "calling a placeholder instance": (b"cos\nsystem\n)R(Vx\ntR.", "Refused to call a system"),
    "calling a set": (b"cbuiltins\nset\n)R)R.", "Refused to call a set"),
    "NEWOBJ of a function": (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)\x81.", "NEWOBJ"),
    "BUILD on a placeholder class": (b"cos\nsystem\n}V__setstate__\nK\x01sb.", "BUILD on a type"),
    "BUILD on an allowed function": (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}V__defaults__\n)s\x86b.", "BUILD"),
    "BUILD on a set": (b"cbuiltins\nset\n)R}b.", "BUILD on a set"),
    "OrderedDict state with non-string keys": (b"ccollections\nOrderedDict\n)R}K\x01K\x02sb.", "attribute names"),
    "OrderedDict state shadowing a method": (b"ccollections\nOrderedDict\n)R}Vitems\nK\x01sb.", "new attribute"),
    "SETITEM on a set": (b"cbuiltins\nset\n)RK\x01K\x02s.", "SETITEM on a set"),
    "APPEND on a set": (b"cbuiltins\nset\n)RK\x01a.", "APPEND on a set"),
    "an allowed call that fails": (b"cbuiltins\nfrozenset\n(cnumpy\nndarray\n)RtR.", "Refused frozenset"),
    "ADDITEMS on a placeholder": (b"\x80\x04cpkg\nS\n)R(K\x01\x90.", "ADDITEMS"),
    "another codec": (b"c_codecs\nencode\n(Vx\nVrot13\ntR.", "_codecs.encode"),
    "reconstructing an allowed class": (
        b"ccopyreg\n_reconstructor\n(cbuiltins\nset\ncbuiltins\nset\nNtR.",
        "_reconstructor",
    ),
    "extension code": (b"\x80\x02\x82\x01.", "extension code"),
    "persistent id without a loader": (b"(Vstorage\ntQ.", "persistent id"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refusals(name):
    data, message = REFUSED[name]
    with pytest.raises(pickle.UnpicklingError, match=message):
        safe_pickle.loads(data)


def test_only_storage_ids_reach_the_storage_loader():
    seen = []
    unpickler = safe_pickle.Unpickler(io.BytesIO(b"(Vmodule\ncos\nsystem\nVsrc.py\nVsource\ntQ."))
    unpickler.persistent_load = seen.append
    with pytest.raises(pickle.UnpicklingError, match="persistent id"):
        unpickler.load()
    fake_storage = b"(Vstorage\ncos\nsystem\nV0\nVcpu\nK\x01tQ."  # a storage id whose type is no storage type
    unpickler = safe_pickle.Unpickler(io.BytesIO(fake_storage))
    unpickler.persistent_load = seen.append
    with pytest.raises(pickle.UnpicklingError, match="persistent id"):
        unpickler.load()
    assert seen == []


def _allowed_values():
    state_dict = collections.OrderedDict(w=torch.randn(2, 3), b=torch.arange(4, dtype=torch.bfloat16)[1:])
    state_dict._metadata = {"": {"version": 1}}
    meta = {
        "set": {1, "a"},
        "frozenset": frozenset([3]),
        "bytes": b"\x00\xff",
        "nested": {"classes": ("road", "car"), "sizes": [1, 2.5, None, True]},
        "parameter": torch.nn.Parameter(torch.ones(2)),
        "view": torch.arange(10.0)[2:8:3],
    }
    return {"state_dict": state_dict, "meta": meta}


# Values that load only as placeholders, with the package of the global their pickle names. numpy's are among
# them: its C code trusts the layout and flags a pickle gives it (see CRASHES).
PLACEHOLDER_VALUES = {
    "numpy scalar": (np.int64(3), "numpy"),
    "numpy float": (np.float32(0.5), "numpy"),
    "numpy array": (np.arange(6.0).reshape(2, 3), "numpy"),
    "numpy object array": (np.array([1, "a"], dtype=object), "numpy"),
    "numpy record array": (np.zeros(2, dtype=[("a", "f4"), ("b", "i8")]), "numpy"),
    "numpy dtype": (np.dtype("f4"), "numpy"),
    "numpy dtype class": (type(np.dtype("f8")), "numpy"),
    "torch dtype": (torch.float16, "torch"),
    "torch size": (torch.Size([2, 3]), "torch"),
    "slice": (slice(1, None, 2), "builtins"),
    "complex": (1 + 2j, "builtins"),
}


@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_allowed_values_load_as_themselves_and_others_as_placeholders(protocol, zip_format):
    original = _allowed_values()
    buffer = io.BytesIO()
    torch.save(
        {**original, "others": {key: value for key, (value, _) in PLACEHOLDER_VALUES.items()}},
        buffer,
        pickle_protocol=protocol,
        _use_new_zipfile_serialization=zip_format,
    )
    buffer.seek(0)
    loaded = torch.load(buffer, map_location="cpu", weights_only=False, pickle_module=safe_pickle)
    assert loaded["state_dict"]._metadata == {"": {"version": 1}}
    for key, value in original["state_dict"].items():
        assert torch.equal(loaded["state_dict"][key], value), key
    for key, value in original["meta"].items():
        got = loaded["meta"][key]
        assert type(got) is type(value), key
        if isinstance(value, torch.Tensor):
            assert got.dtype == value.dtype and got.stride() == value.stride() and torch.equal(got, value), key
        else:
            assert got == value, key
    for key, (_, package) in PLACEHOLDER_VALUES.items():
        got = loaded["others"][key]
        kind = got if isinstance(got, type) else type(got)  # a class or a dtype constant pickles as a name
        assert issubclass(kind, Placeholder) and kind.__module__.split(".")[0] == package, key


@pytest.mark.parametrize("importable_at_load", [False, True])
def test_mmengine_checkpoints_keep_meta_values_and_never_use_their_classes(official, tmp_path, importable_at_load):
    marker, path = tmp_path / "pwned", tmp_path / "iter_160000.pth"
    module = fake_mmengine(marker)
    sys.modules[module.__name__] = module
    try:
        torch.save(runner_checkpoint(module, official, ["road", "car", "sky"]), path)
        torch.load(path, weights_only=False)  # the classes' own code runs under a plain load
        assert marker.exists()
        marker.unlink()
        if not importable_at_load:
            del sys.modules[module.__name__]
        state_dict, class_names = read_official_checkpoint(str(path))
        loaded = torch.load(path, map_location="cpu", weights_only=False, pickle_module=safe_pickle)
        model = load_official_checkpoint(str(path), VARIANT)
    finally:
        sys.modules.pop(module.__name__, None)
    assert not marker.exists()
    assert class_names == ["road", "car", "sky"] and model.config.id2label == {0: "road", 1: "car", 2: "sky"}
    assert state_dict.keys() == official.keys()
    assert all(torch.equal(state_dict[key], value) for key, value in official.items())
    meta = loaded["meta"]
    # numpy values are placeholders holding what numpy would have been given: the dtype (a placeholder) and bytes.
    seed, iter_times = meta["seed"], meta["iter_times"]
    assert type(seed).__qualname__ == "scalar" and type(seed).__module__.startswith("numpy.")
    assert type(seed.args[0]).__qualname__ == "dtype" and seed.args[0].args[0] == "i8"
    assert seed.args[1] == np.int64(1234).tobytes() and meta["time"].args[1] == np.float64(0.25).tobytes()
    assert type(iter_times).__qualname__ == "_reconstruct" and iter_times.args[0].__qualname__ == "ndarray"
    assert iter_times.state[1] == (2,) and iter_times.state[4] == np.array([0.5, 0.25], np.float32).tobytes()
    assert meta["mmengine_version"] == "0.10.4" and meta["dataset_meta"]["palette"][1] == [0, 0, 142]
    assert isinstance(meta["cfg"], Placeholder) and meta["cfg"].items == {"crop_size": (512, 512)}
    buffer = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert type(buffer).__qualname__ == "HistoryBuffer" and type(buffer).__module__ == module.__name__
    assert buffer.state["_log_history"].state[4] == np.array([1.5, 0.5]).tobytes()
    assert buffer.state["statistics_methods"]["min"].__qualname__ == "HistoryBuffer.min"
    assert loaded["hooks"][0].args == ("checkpoint",)
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)


def test_torchs_reader_gets_no_numpy_globals_so_numpy_values_go_to_the_restricted_one(official, tmp_path, monkeypatch):
    path = tmp_path / "numpy_meta.pth"
    meta = {"seed": np.int64(7), "scores": np.arange(3.0), "dataset_meta": {"classes": ["road", "car", "sky"]}}
    torch.save({"state_dict": official, "meta": meta}, path)
    calls, load = [], torch.load

    def spy(*args, **kwargs):
        calls.append((kwargs.get("pickle_module"), set(torch.serialization.get_safe_globals())))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    before = set(torch.serialization.get_safe_globals())
    state_dict, class_names = read_official_checkpoint(str(path))
    assert class_names == ["road", "car", "sky"] and state_dict.keys() == official.keys()
    # torch's reader ran with nothing registered, refused numpy, and the restricted reader read the file.
    assert calls == [(None, before), (safe_pickle, before)]
    assert set(torch.serialization.get_safe_globals()) == before


def test_legacy_tar_files_are_refused_not_extracted(tmp_path):
    path, archive = tmp_path / "old.tar", io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
        link = tarfile.TarInfo("storages")  # torch's tar reader would extract it and read the file it links to
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/hostname"
        tar.addfile(link)
    path.write_bytes(archive.getvalue())
    with pytest.raises(RuntimeError, match="legacy .tar format"):
        read_official_checkpoint(str(path))


TENSOR = b"\x80\x02}Vw\nctorch._utils\n_rebuild_tensor_v2\n("  # {"w": _rebuild_tensor_v2(...)}
STORAGE = b"(Vstorage\nctorch\nFloatStorage\nV0\nVcpu\nK\x04tQ"  # the archive's 4-float storage
NO_HOOKS = b"ccollections\nOrderedDict\n)R"


def _ints(*values) -> bytes:
    return b"(" + b"".join(b"I%d\n" % value for value in values) + b"t"


TENSOR_LAYOUTS = {  # (storage, offset, size, stride, requires_grad, hooks) -> the refusal, or None
    "all four elements": ((STORAGE, b"K\x00", _ints(4), _ints(1), b"\x89", NO_HOOKS), None),
    "every other element, from the second": ((STORAGE, b"K\x01", _ints(2), _ints(2), b"\x89", NO_HOOKS), None),
    "empty, at the end": ((STORAGE, b"K\x04", _ints(0, 5), _ints(2**62, 1), b"\x89", NO_HOOKS), None),
    "one past the end": ((STORAGE, b"K\x01", _ints(4), _ints(1), b"\x89", NO_HOOKS), "reaching element 4 of"),
    "a stride past the end": ((STORAGE, b"K\x00", _ints(2), _ints(4), b"\x89", NO_HOOKS), "reaching element 4"),
    "a reach past int64": ((STORAGE, b"K\x00", _ints(3, 3), _ints(2**62, 2**62), b"\x89", NO_HOOKS), "reaching"),
    "a negative stride": ((STORAGE, b"K\x03", _ints(4), _ints(-1), b"\x89", NO_HOOKS), "tensor layout"),
    "a stride past int64": ((STORAGE, b"K\x00", _ints(1), _ints(2**63), b"\x89", NO_HOOKS), "tensor layout"),
    "sizes and strides of other lengths": ((STORAGE, b"K\x00", _ints(2, 2), _ints(1), b"\x89", NO_HOOKS), "layout"),
    "a placeholder for a storage": ((b"cos\nsystem\n", b"K\x00", _ints(1), _ints(1), b"\x89", NO_HOOKS), "storage"),
    "backward hooks": ((STORAGE, b"K\x00", _ints(1), _ints(1), b"\x89", NO_HOOKS + b"K\x01cos\nsystem\ns"), "hooks"),
    "requires_grad that is no bool": ((STORAGE, b"K\x00", _ints(1), _ints(1), b"K\x01", NO_HOOKS), "requires_grad"),
}


@pytest.mark.parametrize("name", sorted(TENSOR_LAYOUTS))
def test_tensors_address_only_their_own_storage(name):
    arguments, refusal = TENSOR_LAYOUTS[name]
    data = io.BytesIO(_torch_zip(TENSOR + b"".join(arguments) + b"tRs."))
    if refusal is None:
        tensor = torch.load(data, map_location="cpu", weights_only=False, pickle_module=safe_pickle)["w"]
        assert tensor.untyped_storage().nbytes() == 16 and not tensor.any()
    else:
        with pytest.raises(pickle.UnpicklingError, match=refusal):
            torch.load(data, map_location="cpu", weights_only=False, pickle_module=safe_pickle)


def test_torchscript_archives_are_refused_not_loaded(tmp_path):
    path = tmp_path / "scripted.pth"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(RuntimeError, match="TorchScript"):
        read_official_checkpoint(str(path))
