"""A pickle reader that never runs code from the file, for checkpoints of unknown origin.

A pickle is a small program: GLOBAL names any importable object and REDUCE calls it, so a `.pth` whose pickle says
`os.system("...")` runs that command under a plain `pickle.load` / `torch.load(weights_only=False)`. This module
is a `pickle_module` for `torch.load` that gives the file no way to name or call anything outside a fixed list:

    torch.load(path, map_location="cpu", weights_only=False, pickle_module=offseg_hf.models.safe_pickle)

What loads as itself: plain tensors and `nn.Parameter`s (rebuilt from the file's storages, after checking that
every element they address lies inside the storage, and only without hooks or conj/neg bits),
`collections.OrderedDict` (a state dict, with its `_metadata`), and what pickle builds without naming a global:
dict, list, tuple, str, bytes, int, float, bool, None, set and frozenset (protocol 2, torch's default, names
`set`/`frozenset` and writes bytes as `_codecs.encode(text, "latin1")`; these three are allowed for that), and a
bytearray under protocol 5 (its own opcode). Everything else becomes a placeholder, whatever is installed: every
other global -- numpy included (arrays, scalars, dtypes: numpy's C code trusts the layout and object flags it is
given, so a file could make it read raw bytes as object pointers), torch dtypes, `torch.Size`, `slice`,
`complex`, mmengine's classes, `os.system` -- is a `Placeholder` subclass named after it, never imported; calling
it records the arguments (`args`, `kwargs`), BUILD records `state`, and nothing else happens. A numpy value thus
reads as e.g. a `numpy._core.multiarray.scalar` placeholder whose `args` hold the dtype (another placeholder) and
the raw bytes. Two more stand-ins: `builtins.getattr` (answers only for placeholder classes, with a placeholder)
and `copyreg._reconstructor` (builds only placeholders and OrderedDicts).

Every opcode that can call something is checked here, not left to the object:
- REDUCE, INST, OBJ call only allowlisted callables and placeholder classes; NEWOBJ/NEWOBJ_EX call `__new__` of
  allowlisted classes and placeholder classes only. An allowlisted callable that fails raises `UnpicklingError`.
- BUILD stores the state in a placeholder, or sets attributes of an OrderedDict that shadow none of its own
  (`state_dict()._metadata`); any other target (a class, a function, a tensor, a set) is refused, so a pickle
  cannot rebind attributes of torch's functions or a state dict's methods.
- SETITEM(S), APPEND(S), ADDITEMS act only on plain dicts/lists/sets and placeholders.
- EXT1/2/4 (the `copyreg` extension registry) are refused.
- PERSID/BINPERSID pass only `("storage", <storage type>, key, location, numel[, view])` ids to torch's storage
  loader (set by `torch.load`, which checks each storage against its record); others (the legacy format's
  pickled module sources) are refused.

It does not bound memory: a hostile file can still ask for a huge storage. Refusals raise `pickle.UnpicklingError`.
"""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import pickle
import sys
from typing import Any

import torch

__all__ = ["Placeholder", "Unpickler", "load", "loads"]

UnpicklingError = pickle.UnpicklingError


class Placeholder:
    """Stands in for every object the allowlist does not name: classes of packages that may not even be installed
    (mmengine's `HistoryBuffer`, `ConfigDict`, ...) and anything a hostile file names (`os.system`). Subclasses
    carry the original module and qualified name. Instances keep what the pickle gave them, inert: `args`/`kwargs`
    (the call), `state` (BUILD), `items` (dict subclasses are pickled item by item), `values` (list subclasses)."""

    def __new__(cls, *args, **kwargs):
        instance = super().__new__(cls)
        instance.args, instance.kwargs = args, kwargs
        return instance

    def __init__(self, *args, **kwargs):
        pass  # __new__ kept the arguments; NEWOBJ calls only __new__

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values):
        for value in values:
            self.append(value)

    def __repr__(self) -> str:
        return f"<placeholder {type(self).__module__}.{type(self).__qualname__}>"


@functools.cache
def placeholder_class(module: str, qualname: str) -> type[Placeholder]:
    """The placeholder class for global `module.qualname` (one per name, so identical globals stay identical)."""
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise UnpicklingError("A global's module and name must be strings.")
    try:
        return type(qualname.rpartition(".")[2], (Placeholder,), {"__module__": module, "__qualname__": qualname})
    except (TypeError, ValueError) as error:  # e.g. a NUL in the name
        raise UnpicklingError(f"Unusable global name {module!r}.{qualname!r}: {error}") from None


def _is_placeholder_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Placeholder)


def _placeholder_getattr(obj: Any, name: Any, *default: Any) -> type[Placeholder]:
    """`builtins.getattr` as pickles use it: protocol 2 writes a method `Class.method` as `getattr(Class, "method")`
    (mmengine's `HistoryBuffer` keeps such references). Answered only for placeholder classes, with another
    placeholder; a real getattr on an allowed object could walk from a function to its module's globals."""
    if _is_placeholder_class(obj) and isinstance(name, str) and not default:
        return placeholder_class(obj.__module__, f"{obj.__qualname__}.{name}")
    raise UnpicklingError(f"Refused getattr({type(obj).__name__} object, {name!r}): only placeholders answer it.")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """`copyreg._reconstructor` (protocols 0 and 1 rebuild dict/list subclasses with it), limited to building a
    placeholder or an empty OrderedDict; the real one calls `base.__new__` and `base.__init__` of any class."""
    if _is_placeholder_class(cls):
        return cls(state) if state is not None else cls()
    if cls is collections.OrderedDict and state is None:
        return collections.OrderedDict()
    raise UnpicklingError(f"Refused copyreg._reconstructor for {type(cls).__name__} {getattr(cls, '__name__', '')}")


def _latin1_encode(text: Any, encoding: Any = "latin1", errors: Any = "strict") -> bytes:
    """`_codecs.encode`, which protocol 2 uses for bytes (`encode(str, "latin1")`). Other codecs are refused: the
    codec registry can import modules by name."""
    if type(text) is not str or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise UnpicklingError(f"Refused _codecs.encode with encoding {encoding!r}.")
    return text.encode("latin1")


_INT64_MAX = 2**63 - 1


def _is_index(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _INT64_MAX


def _is_empty_dict(value: Any) -> bool:
    """What torch.save writes for a tensor's backward hooks (never serialized) and, unless it has the conj/neg
    bit, for its metadata."""
    return type(value) in (dict, collections.OrderedDict) and not value


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """`torch._utils._rebuild_tensor_v2`, what `torch.save` writes for every plain tensor, with its arguments
    checked first: a storage from torch's loader, non-negative offset/sizes/strides (as torch writes them) that
    address only elements inside that storage, a bool, no hooks and no conj/neg metadata. torch's `set_` also
    checks bounds, but grows a resizable storage (the legacy format's) instead of refusing."""
    if type(storage) is not torch.storage.TypedStorage:
        raise UnpicklingError(f"Refused a tensor whose storage is a {type(storage).__name__} object.")
    shape_ok = type(size) is tuple and type(stride) is tuple and len(size) == len(stride)
    if not (shape_ok and _is_index(storage_offset) and all(map(_is_index, size + stride))):
        raise UnpicklingError(f"Refused tensor layout: offset {storage_offset!r}, size {size!r}, stride {stride!r}.")
    empty_extras = _is_empty_dict(backward_hooks) and (metadata is None or _is_empty_dict(metadata))
    if type(requires_grad) is not bool or not empty_extras:
        raise UnpicklingError("Refused a tensor with hooks, metadata or a non-bool requires_grad.")
    # Python ints: no overflow. The last element addressed must lie in the storage (its start, if empty).
    reach = sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    last = storage_offset + reach if all(size) else storage_offset - 1
    if last >= storage._size():
        raise UnpicklingError(
            f"Refused a tensor reaching element {last} of a storage of {storage._size()}: offset {storage_offset}, "
            f"size {size}, stride {stride}."
        )
    no_hooks = collections.OrderedDict()
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, no_hooks)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """`torch._utils._rebuild_parameter` (an `nn.Parameter`), for a tensor rebuilt above, a bool and no hooks."""
    if type(data) is not torch.Tensor or type(requires_grad) is not bool or not _is_empty_dict(backward_hooks):
        raise UnpicklingError("Refused a parameter that is not a plain tensor, a bool and no hooks.")
    return torch._utils._rebuild_parameter(data, requires_grad, collections.OrderedDict())


# Exact (module, name) -> object. Nothing else is ever resolved; every other name becomes a placeholder.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    # The type of every state dict (`Module.state_dict()`); BUILD restores its `_metadata`.
    ("collections", "OrderedDict"): collections.OrderedDict,
    # What torch.save writes for each tensor and parameter; both check their arguments (above).
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    # Plain containers: protocol 2 (torch.save's default) writes a set as `set([...])`, a frozenset likewise.
    # They only hash their items, and every type a pickle can build here hashes as a builtin or by identity.
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    # Protocol 2 writes bytes as `_codecs.encode(text, "latin1")`; latin-1 only (above).
    ("_codecs", "encode"): _latin1_encode,
    # Protocol 2 writes a method reference (mmengine's HistoryBuffer keeps some) as `getattr(Class, "name")`;
    # answered only for placeholder classes, with a placeholder.
    ("builtins", "getattr"): _placeholder_getattr,
    # Protocols 0 and 1 rebuild objects of classes without `__reduce__` with it; placeholders/OrderedDicts only.
    ("copyreg", "_reconstructor"): _reconstructor,
}
_ALLOWED_CALLABLES = {id(obj) for obj in ALLOWED_GLOBALS.values() if callable(obj)}
_ALLOWED_CLASSES = {id(obj) for obj in ALLOWED_GLOBALS.values() if isinstance(obj, type)}


def _is_new_attribute(name: Any) -> bool:
    return type(name) is str and not hasattr(collections.OrderedDict, name) and not name.startswith("__")


def _may_call(func: Any) -> bool:
    return _is_placeholder_class(func) or id(func) in _ALLOWED_CALLABLES


def _call(func: Any, args: Any, kwargs: Any = None) -> Any:
    kwargs = {} if kwargs is None else kwargs
    if type(args) is not tuple or type(kwargs) is not dict:
        raise UnpicklingError("Call arguments must be a tuple and a dict.")
    if not _may_call(func):
        kind = type(func).__name__
        raise UnpicklingError(f"Refused to call a {kind} object: only allowed callables and placeholder classes are.")
    try:
        return func(*args, **kwargs)
    except UnpicklingError:
        raise
    except Exception as error:  # e.g. frozenset(<placeholder>): not iterable (placeholder classes never raise)
        raise UnpicklingError(f"Refused {func.__name__}(...): {type(error).__name__}: {error}") from error


def _is_storage_id(pid: Any) -> bool:
    """torch's persistent id of a tensor storage: ("storage", StorageType, key, location, numel[, view])."""
    return (
        type(pid) is tuple
        and len(pid) in (5, 6)
        and pid[0] in ("storage", b"storage")
        and isinstance(pid[1], torch.serialization.StorageType)
        and type(pid[2]) is str
        and type(pid[3]) in (str, bytes)
        and _is_index(pid[4])
        and (len(pid) == 5 or pid[5] is None or _is_view(pid[5]))
    )


def _is_view(view: Any) -> bool:
    """The legacy format's storage view: (view key, offset, numel), all in elements."""
    return type(view) is tuple and len(view) == 3 and type(view[0]) is str and all(map(_is_index, view[1:]))


class Unpickler(pickle._Unpickler):
    """The pure-Python unpickler with its calling opcodes restricted (see the module docstring). Pure Python so
    that every opcode's handler is visible and replaceable; a checkpoint's pickle holds no tensor data, only
    its structure, so speed does not matter."""

    dispatch = dict(pickle._Unpickler.dispatch)
    _storage_loader = None

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # Python 2 names (protocol 2 writes `__builtin__.set`)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[module, name]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[module, name]
        return placeholder_class(module, name)

    # torch.load assigns its storage loader to `persistent_load`; only storage ids ever reach it.
    @property
    def persistent_load(self):
        return self._checked_persistent_load

    @persistent_load.setter
    def persistent_load(self, loader):
        self._storage_loader = loader

    def _checked_persistent_load(self, pid: Any) -> Any:
        if self._storage_loader is None or not _is_storage_id(pid):
            raise UnpicklingError(f"Refused a persistent id that is not a tensor storage: {type(pid).__name__}")
        return self._storage_loader(pid)

    def _instantiate(self, klass: Any, args: list) -> None:  # INST and OBJ
        self.append(_call(klass, tuple(args)))

    def get_extension(self, code: int) -> None:  # EXT1, EXT2, EXT4
        raise UnpicklingError(f"Refused extension code {code}: the copyreg registry can name any global.")

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = _call(self.stack[-1], args)

    def _new(self, cls: Any, args: Any, kwargs: Any) -> None:
        if not isinstance(cls, type) or not (_is_placeholder_class(cls) or id(cls) in _ALLOWED_CLASSES):
            raise UnpicklingError(f"Refused NEWOBJ of a {type(cls).__name__} object.")
        if type(args) is not tuple or type(kwargs) is not dict:
            raise UnpicklingError("NEWOBJ arguments must be a tuple and a dict.")
        self.append(cls.__new__(cls, *args, **kwargs))

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        self._new(self.stack.pop(), args, {})

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        self._new(self.stack.pop(), args, kwargs)

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Placeholder):
            Placeholder.__setstate__(inst, state)
        elif type(inst) is collections.OrderedDict:
            if type(state) is tuple and len(state) == 2 and state[1] is None:
                state = state[0]
            # An instance attribute named like a method (`items`, `get`) would replace it for whoever reads the dict.
            if type(state) is not dict or not all(_is_new_attribute(key) for key in state):
                raise UnpicklingError("An OrderedDict's pickled state must be a dict of new attribute names.")
            inst.__dict__.update(state)
        else:
            raise UnpicklingError(f"Refused BUILD on a {type(inst).__name__} object.")

    def _target(self, kinds: tuple[type, ...], opcode: str) -> Any:
        target = self.stack[-1]
        if type(target) not in kinds and not isinstance(target, Placeholder):
            raise UnpicklingError(f"Refused {opcode} on a {type(target).__name__} object.")
        return target

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._target((dict, collections.OrderedDict), "SETITEM")[key] = value

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._target((dict, collections.OrderedDict), "SETITEMS")
        for index in range(0, len(items), 2):
            target[items[index]] = items[index + 1]

    def _load_append(self) -> None:
        value = self.stack.pop()
        self._target((list,), "APPEND").append(value)

    def _load_appends(self) -> None:
        items = self.pop_mark()
        self._target((list,), "APPENDS").extend(items)

    def _load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set:
            raise UnpicklingError(f"Refused ADDITEMS on a {type(target).__name__} object.")
        target.update(items)

    for _opcode, _handler in (
        (pickle.REDUCE, _load_reduce),
        (pickle.NEWOBJ, _load_newobj),
        (pickle.NEWOBJ_EX, _load_newobj_ex),
        (pickle.BUILD, _load_build),
        (pickle.SETITEM, _load_setitem),
        (pickle.SETITEMS, _load_setitems),
        (pickle.APPEND, _load_append),
        (pickle.APPENDS, _load_appends),
        (pickle.ADDITEMS, _load_additems),
    ):
        dispatch[_opcode[0]] = _handler
    del _opcode, _handler


def load(file, **kwargs) -> Any:
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs) -> Any:
    return load(io.BytesIO(data), **kwargs)


def read_checkpoint(path: str) -> Any:
    """The object saved in a torch file at `path`, never running code from it.

    First torch's own restricted loader, as is (`weights_only=True`, with no globals added; ones the caller registered
    with `torch.serialization.add_safe_globals` do apply): tensors and plain containers. A file that loader refuses
    (`UnpicklingError`: e.g. an mmengine runner checkpoint, which also pickles numpy values and mmengine objects) is
    read with this module's `Unpickler`, so numpy's, mmengine's and every other named object become inert
    placeholders. Anything else torch rejects up front (a TorchScript archive, a legacy tar file) is raised.
    """
    with open(path, "rb") as handle:  # both readers read this one open file, not the path twice
        try:
            try:
                return torch.load(handle, map_location="cpu", weights_only=True, mmap=False)
            except pickle.UnpicklingError:
                handle.seek(0)
                return torch.load(
                    handle, map_location="cpu", weights_only=False, mmap=False, pickle_module=sys.modules[__name__]
                )
        except (KeyError, IndexError, EOFError, UnicodeDecodeError) as error:
            # What a file that is no torch file at all (text, a truncated download) makes the unpicklers raise.
            raise pickle.UnpicklingError(
                f"{path} is not a PyTorch checkpoint ({type(error).__name__} while unpickling: not a torch.save file, "
                "or a truncated one)."
            ) from error
